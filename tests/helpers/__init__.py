"""Shared by the test folders (imported as `tests.helpers.<module>`; the repo root is on pytest's path):
`dumps` (generated records and shards for the dump tests), `train` (tiny draft configs, the small SmolLM2 dump),
`slurm` (the test cluster: is it up, `dflashkit` as a subprocess, waiting on jobs and runs), `procs` (waiting and
killing at a moment), `server` (the session server's served name and chat template)."""
