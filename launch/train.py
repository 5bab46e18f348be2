"""Train a DUNE student: `python|torchrun|deepspeed launch/train.py --config configs/X.yaml [k=v ...]`."""

import signal
import sys

if __name__ == "__main__":
    # Stop signals (dune_scale.engine.preemption.SIGNALS) wait while the program imports: it takes
    # them over first thing, and then stops with the requeue code instead of being killed.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    from dune_scale.cli.train import main

    sys.exit(main())
