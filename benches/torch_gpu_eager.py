"""PyTorch's side of benches/gpu-check.sh: the workloads of ../shared/bench/torch_gpu_bench.py,
eager only by default, plus each one's peak device memory.

The shared script runs torch.compile for every model at import time (1-2 minutes each), so this
wrapper does not run it: it executes the shared script's definitions (everything before its first
top-level `print(`), reads the `bench(...)` calls that follow with `ast`, and runs those whose
`compile_` argument is False (all of them with --compile). The workloads stay the shared
script's own; nothing is copied by hand.

    python3 benches/torch_gpu_eager.py SCRIPT OUT.json [--compile]   run on the GPU
    python3 benches/torch_gpu_eager.py SCRIPT --list                 print the workloads (no torch)
"""
import ast
import json
import sys
import time


def split_script(path):
    """(source of the definitions, [(args, kwargs)] of the top-level bench() calls)."""
    src = open(path).read()
    tree = ast.parse(src)
    calls, first_print = [], None
    for node in tree.body:
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "bench":
                args = [ast.literal_eval(a) for a in call.args]
                kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
                calls.append((args, kwargs))
        is_print = (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "print"
        )
        if is_print and first_print is None:
            first_print = node.lineno
    if first_print is None or not calls:
        sys.exit(f"{path}: found no top-level print( or no bench(...) calls; has it changed?")
    defs = "\n".join(src.splitlines()[: first_print - 1])
    return defs, calls


def is_compiled(args, kwargs):
    # bench(name, V, T, L, d, h, B, compile_, steps=20)
    return bool(kwargs.get("compile_", args[7] if len(args) > 7 else False))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    script, dest = sys.argv[1], sys.argv[2]
    with_compile = "--compile" in sys.argv[3:]
    defs, calls = split_script(script)
    chosen = [c for c in calls if with_compile or not is_compiled(*c)]
    if dest == "--list":
        for args, kwargs in chosen:
            print(json.dumps({"args": args, "kwargs": kwargs}))
        return
    g = {"__name__": "torch_gpu_bench"}
    exec(compile(defs, script, "exec"), g)
    torch = g["torch"]
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    results = []
    for args, kwargs in chosen:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            r = g["bench"](*args, **kwargs)
        except Exception as e:  # one workload failing must not lose the others
            r = {"name": args[0], "compile": is_compiled(args, kwargs), "error": repr(e)}
            print(json.dumps(r), flush=True)
        r["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        with open(dest, "w") as f:  # rewritten after each workload: a timeout keeps the rest
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
