"""`sgz bench`: how fast the model step and the HTTP service are, against baselines run in the
same process or on the same machine in the same run (see bench/cli.py)."""
