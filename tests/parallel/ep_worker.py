"""One rank of the expert-parallel CPU check (tests/parallel/test_expert_parallel.py): gloo process group,
tiny model with this rank's share of the experts, greedy generation of this rank's prompts -> JSON."""

import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the oracle


def main(model: str, rank: int, world: int, rdv: str, prompts_json: str, out: str, max_tokens: int) -> None:
    from oracle import generate
    from dsv4.model import build_model
    from dsv4.parallel import ExpertParallel

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        ep = ExpertParallel()
        lm = build_model(model, device="cpu", dtype="float32", numerics="plain", expert_parallel=ep)
        mine = json.loads(prompts_json)
        res = generate(lm, mine, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        with open(out, "w") as f:
            json.dump({"rank": rank, "local_experts": list(lm.opts.expert_map.local_ids),
                       "tokens": [o.token_ids for o in res.outputs]}, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7]))
