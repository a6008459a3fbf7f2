"""Logits of a GGUF file in llama.cpp (llama-cpp-python), for comparing with transformers in tests."""
import numpy as np


def llama_cpp_logits(llama_cpp, path, ids):
    """Per-position logits of `ids` (1, T); an F32 KV cache (llama.cpp defaults to F16), so only the
    arithmetic order differs from an fp32 transformers forward."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, logits_all=True,
                          type_k=0, type_v=0, verbose=False)
    try:
        llm.eval(ids[0].tolist())
        return np.array(llm.scores[:ids.shape[1]])
    finally:
        llm.close()
