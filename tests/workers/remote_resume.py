"""Two jobs in one launch: train to step 2 uploading checkpoints, then a job with an empty output
folder (a fresh node) that resumes from the object store to step 4."""

import sys

from dune_scale.cli.train import parse_args, train

if __name__ == "__main__":
    config, first, second, *overrides = sys.argv[1:]
    train(parse_args(["--config", config, f"run.output_dir={first}", "train.max_steps=2", *overrides]))
    train(parse_args(["--config", config, f"run.output_dir={second}", "train.max_steps=4", *overrides]))
