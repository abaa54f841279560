"""Piecewise graphs: device memory the pool and the shared buffers hold after start-up, per bucket captured, beside
the eager activation peak the cache planner reserves (4 Flash layers, dummy weights).

    PYTHONPATH=. TRITON_INTERPRET=0 OUT=. python3 benchmarks/piecewise_memory.py
"""
import json
import os

from dsv4.config import EngineConfig
from dsv4.engine.llm_engine import LLMEngine

eng = LLMEngine(EngineConfig(model="deepseek-v4-flash", load_format="dummy", num_layers=4, max_model_len=8192,
                             max_num_seqs=64, max_num_batched_tokens=2048, kv_cache_memory=4 << 30))
pw = eng.runner.piecewise
r = {"piecewise_memory_bytes": eng.piecewise_memory, "capture_bytes": pw.capture_bytes, "capture_s": pw.capture_s,
     "buckets": pw.buckets, "shared_bytes": sum(t.numel() * t.element_size() for t in pw._shared.values())}
r["eager_activation_peak_2048_bytes"] = eng._profile_activations(2048)
print(json.dumps(r))
json.dump(r, open(os.environ["OUT"] + "/mem.json", "w"), indent=1)
