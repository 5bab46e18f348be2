"""torchrun worker (2 ranks): validation batches stay in lockstep when ranks hold different numbers of
batches, and a stop asked on one rank abandons the validation on both. Writes <out>/rank_<r>.json."""

import json
import sys
from pathlib import Path

import torch

from dune_scale import distributed
from dune_scale.eval.validation import ValidationAbandoned, lockstep_batches

if __name__ == "__main__":
    info = distributed.init_distributed("cpu")
    try:
        loaders = [list(range(3 + 2 * info.rank)), list(range(4))]  # rank 0: 3 then 4, rank 1: 5 then 4
        uneven = list(lockstep_batches(loaders, None, lambda: False, info.device))
        capped = list(lockstep_batches(loaders, 2, lambda: False, info.device))
        seen: list[int] = []
        try:
            seen.extend(lockstep_batches(loaders, None, lambda: info.rank == 1 and len(seen) == 2, info.device))
            abandoned = False
        except ValidationAbandoned:
            abandoned = True
        result = {"uneven": uneven, "capped": capped, "seen": seen, "abandoned": abandoned}
        (Path(sys.argv[1]) / f"rank_{info.rank}.json").write_text(json.dumps(result))
        torch.distributed.barrier()
    finally:
        distributed.shutdown()
