"""One rank of the exchange check (tests/parallel/test_expert_parallel.py): the all-to-all and all-gather
exchanges of ExpertParallel give the single-process routed output on random routings (every rank its own
token count, one rank with none), with a toy expert (expert e scales by its own random matrix)."""

import json
import sys

import torch
import torch.distributed as dist


def main(rank: int, world: int, rdv: str, out: str) -> None:
    from dsv4.parallel.ep import ExpertParallel

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        E, D, k = 8, 16, 3
        mats = torch.randn(E, D, D, generator=torch.Generator().manual_seed(0))  # every rank: the same experts
        counts = [5, 0, 9, 2][:world]
        res = {}
        for trial in range(3):
            g = torch.Generator().manual_seed(100 * trial + rank)
            T = counts[(rank + trial) % world]
            x = torch.randn(T, D, generator=g)
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.int64)
            w = torch.rand(T, k, generator=g)
            ep = ExpertParallel(exchange="alltoall")
            mine = set(ep.expert_map(E).local_ids)

            def local(xa, ia, wa):  # this rank's experts only; remote experts add zero
                y = torch.zeros(xa.shape[0], D)
                for j in range(ia.shape[1]):
                    for e in mine:
                        m = ia[:, j] == e
                        y[m] += wa[m, j, None] * (xa[m] @ mats[e])
                return y

            want = torch.zeros(T, D)
            for j in range(k):
                for t in range(T):
                    want[t] += w[t, j] * (x[t] @ mats[ids[t, j]])
            a2a = ep.routed(x, ids, w, local)
            ag = ExpertParallel(exchange="allgather")
            ag.expert_map(E)
            gath = ag.routed(x, ids, w, local)
            res[trial] = {"T": T, "a2a_err": float((a2a - want).abs().max()) if T else 0.0,
                          "ag_err": float((gath - want).abs().max()) if T else 0.0,
                          "shape": list(a2a.shape), "a2a_vs_ag": float((a2a - gath).abs().max()) if T else 0.0}
        with open(out, "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
