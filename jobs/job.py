"""FLARE 2.9's job.py for every adpfl job: a Recipe run on SimEnv, PocEnv or ProdEnv.

    python jobs/job.py --task skin2d --mode adpfl --env sim|poc|prod [--startup-kit DIR]
    python jobs/job.py --help

The recipe is built from the one job definition (adpfl.flare.jobs), the same one the job
folders next to this file are exported from (see adpfl.flare.recipe).
"""

from adpfl.flare.recipe import cli

if __name__ == "__main__":
    cli()
