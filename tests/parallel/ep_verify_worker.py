"""One rank of the expert-parallel verify-graph check (tests/parallel/test_ep_verify_graphs.py), on the CPU:
the engine builds its verify and MTP draft graphs as on a GPU but runs them uncaptured (the same padded
static-buffer steps, frozen host mirrors, the metadata ops through interpreted Triton, as
tests/engine/test_verify_graphs.py does in one process). Rank 0 drives the DPEngine front end, rank 1
serves steps; rank 0 writes the greedy tokens and step counts as JSON."""

import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(os.path.dirname(HERE), "engine"), os.path.dirname(HERE)]


def patch() -> None:
    import dsv4.engine.cuda_graphs as cg
    import dsv4.engine.llm_engine as le
    import dsv4.model.builder as builder
    from test_verify_graphs import meta_ops_table

    builder.resolve = meta_ops_table
    cg.capture_blockers = lambda ops: []
    le.capture_blockers = lambda ops: []
    le.DecodeGraphs = functools.partial(le.DecodeGraphs, capture=False, batch_buckets=(1, 2), min_context=64)
    le.MTPDraftGraphs = functools.partial(le.MTPDraftGraphs, capture=False)
    le.LLMEngine._graphs_wanted = lambda self: True
    le.LLMEngine._capture_graphs = lambda self, *a: None


def main(tiny: str, rank: int, port: int, k: int, prompts: list[list[int]], max_tokens: list[int], out: str) -> None:
    patch()
    from dsv4.config import EngineConfig
    from dsv4.engine.sampling_params import SamplingParams
    from dsv4.parallel.launch import DistSpec, run_worker, start_engine

    spec = DistSpec(rank, 2, rank, f"tcp://127.0.0.1:{port}")
    cfg = EngineConfig(model=tiny, device="cpu", dtype="float32", numerics="plain", max_model_len=256,
                       max_num_seqs=4, speculative_tokens=k)
    if rank:
        run_worker(cfg, spec)
        return
    eng = start_engine(cfg, spec)
    try:
        for i, (p, n) in enumerate(zip(prompts, max_tokens)):
            eng.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False),
                            request_id=str(i))
        final = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    final[o.request_id] = o.outputs[0].token_ids
        r = eng.local.runner
        res = {"tokens": [final[str(i)] for i in range(len(prompts))], "verify_graph_steps": r.verify_graph_steps,
               "draft_graphs": r.draft_graphs is not None, "owners_seen": len(final)}
    finally:
        eng.shutdown()
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), json.loads(a[4]), json.loads(a[5]), a[6])
