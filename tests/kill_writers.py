"""Kill every dq_kit writer at every file-system step of a save and report what the target holds.

Run by ``tests/test_files.py`` in a subprocess: ``python tests/kill_writers.py WORKDIR [--no-exchange] WRITER...``
(``--no-exchange``: as on an OS without an atomic folder swap, where the next save or load puts
back an output a kill left moved aside).
For each writer it saves an old output "a" in a fresh folder, forks a child that saves a new
output "b" to the same path and SIGKILLs itself just before its N-th file-system call (every N
until a save completes), and records whether the path then holds the old output, the new one,
or something else. A final save after each kill records any stray staging entry left behind.
Prints one JSON object: ``{writer: {"steps": K, "states": [...], "strays": [...]}}``.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path


def _fingerprint(path: Path) -> str:
    """Content hash of a file or folder; a report's factors file is hashed by content, not its random name."""
    if not path.exists():
        return "missing"
    if path.is_file():
        data = json.loads(path.read_text())
        factors = (data.get("meta") or {}).pop("corrections_file", None)
        if factors:
            factor_file = path.parent / factors
            data["factors"] = hashlib.sha256(factor_file.read_bytes()).hexdigest() if factor_file.is_file() else "missing"
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _writers() -> dict:
    import pandas as pd
    import torch

    import dq_kit as dq

    torch.manual_seed(0)
    model = dq.quantize(dq.tiny.build_tiny_model("llama"))
    peft_model = dq.add_lora(dq.quantize(dq.tiny.build_tiny_model("llama")), r=2, gradient_checkpointing=False)
    tokenizer = dq.tiny.tiny_processor("llama")

    def adapter_version(version: str) -> None:
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.fill_(0.01 if version == "a" else 0.02)

    def report(version: str) -> dq.QuantReport:
        table = pd.DataFrame({"module": ["m"], "weight_error": [0.1 if version == "a" else 0.2], "in_features": [4], "out_features": [3]})
        value = 1.0 if version == "a" else 2.0
        return dq.QuantReport(table, corrections={"m": (torch.full((2, 4), value), torch.full((3, 2), value))})

    def merge(version: str, path: Path) -> None:
        fresh = dq.add_lora(dq.quantize(dq.tiny.build_tiny_model("llama")), r=2, gradient_checkpointing=False)
        with torch.no_grad():
            for name, parameter in fresh.named_parameters():
                if "lora_B" in name:
                    parameter.fill_(0.01 if version == "a" else 0.02)
        dq.merge_to_16bit(fresh, path=path)

    def save_adapter(version: str, path: Path) -> None:
        adapter_version(version)
        dq.save_adapter(peft_model, path)

    return {
        "plan.save": lambda version, path: dq.Plan(keep=(f"m.{version}",)).save(path),
        "report.save": lambda version, path: report(version).save(path),
        "dq.save": lambda version, path: dq.save(model, path, processor=tokenizer if version == "b" else None),
        "save_adapter": save_adapter,
        "merge_to_16bit": merge,
    }


def _save_killed_at(write, path: Path, kill_at: int, counter_file: Path) -> int:
    """Fork a child that saves version "b" and kills itself before its ``kill_at``-th file-system call
    (0: never); return its exit status (the count of calls goes to ``counter_file``)."""
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    from dq_kit import files

    calls = 0

    def counted(function):
        def wrapper(*args, **kwargs):
            nonlocal calls
            if function is builtins.open and not any(flag in str(args[1] if len(args) > 1 else kwargs.get("mode", "r")) for flag in "wax+"):
                return function(*args, **kwargs)
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return wrapper

    for owner, name in ((os, "replace"), (os, "rename"), (os, "fsync"), (os, "unlink"), (shutil, "rmtree"), (builtins, "open"), (files, "_exchange")):
        setattr(owner, name, counted(getattr(owner, name)))
    try:
        write("b", path)
    except BaseException as exc:  # noqa: BLE001 - any failure is reported to the parent
        counter_file.write_text(f"error: {exc!r}")
        os._exit(1)
    Path(counter_file).write_text(str(calls))
    os._exit(0)


def main(workdir: str, names: list[str]) -> None:
    import torch

    from dq_kit import files

    exchange = "--no-exchange" not in names
    names = [n for n in names if n != "--no-exchange"]
    if not exchange:
        files._exchange = lambda first, second: False

    torch.set_num_threads(1)  # a forked child must not need the parent's thread pool
    writers = _writers()
    results = {}
    for name in names:
        write, root = writers[name], Path(workdir) / name.replace(".", "_")
        target = "out.json" if name in ("plan.save", "report.save") else "out"
        fingerprints, steps, states, strays = {}, None, [], []
        kill_at = 0
        while True:
            folder = root / f"kill{kill_at}"
            folder.mkdir(parents=True)
            write("a", folder / target)
            fingerprints.setdefault("a", _fingerprint(folder / target))
            status = _save_killed_at(write, folder / target, kill_at, folder.parent / "count")
            if kill_at == 0:
                if status != 0:
                    raise SystemExit(f"{name}: the save without a kill failed: {(folder.parent / 'count').read_text()}")
                steps = int((folder.parent / "count").read_text())
                fingerprints["b"] = _fingerprint(folder / target)
            else:
                if not exchange:
                    files.recover_interrupted(folder / target)  # what the next load or save does
                state = _fingerprint(folder / target)
                states.append(next((v for v, f in fingerprints.items() if f == state), "neither"))
                write("b", folder / target)  # a later save tidies what the killed one left
                strays += [p.name for p in folder.iterdir() if p.name != target and not p.name.startswith(f"{Path(target).stem}.corrections.")]
                factor_files = list(folder.glob("out.corrections.*"))
                if len(factor_files) > (1 if name == "report.save" else 0):
                    strays += [p.name for p in factor_files]
            kill_at += 1
            if kill_at > steps:
                break
        results[name] = {"steps": steps, "states": states, "strays": strays}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
