"""The gateway's benchmark: `python -m bench` (or `bench/run.py`); bench/README.md says what it measures.

One module per job: tokens (sign the ID tokens), servers (the issuer, the gateway and the peer as processes),
stores (throwaway Redis, Sentinel and Cluster), load (wrk and the CPU it costs), plan (what is measured),
report (the table and the verdicts), profiling (py-spy tallies), peer (the minimal exchange it is compared with),
cli (arguments and the order of the runs).
"""
