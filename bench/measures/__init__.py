"""One module per measure of ``bench/run.py``; each has ``run(bench, ...)``, which records
its figures (Clustorage first, then the same measure of each peer) into the bench."""
