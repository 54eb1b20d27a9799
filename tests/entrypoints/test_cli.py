"""The CLI as a new user meets it after the README's first command."""

import shutil
import subprocess
import sys

import pytest

JAXPAGE = shutil.which("jaxpage")


def _run(*args, timeout=600):
    cmd = [JAXPAGE, *args] if JAXPAGE else [sys.executable, "-m", "jaxpage.entrypoints.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_chat_answers_paris(default_gguf):
    assert JAXPAGE, "the `jaxpage` console script is not installed"
    proc = _run("chat", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_unknown_model_path_is_one_clear_line(tmp_path):
    proc = _run("generate", "hi", "--model", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("jaxpage: error:") and "nope" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    proc = _run("generate", "hi", "--model", str(tmp_path))
    assert proc.returncode == 2 and "BertModel" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_sampling_flag_is_a_clear_error(default_gguf):
    proc = _run("generate", "hi", "--temperature", "5")
    assert proc.returncode == 2 and "temperature" in proc.stderr and "Traceback" not in proc.stderr


def test_engine_flags_reach_engine_args():
    import argparse

    from jaxpage.entrypoints import cli

    p = argparse.ArgumentParser()
    cli._add_engine_args(p)
    args = cli._engine_args(p.parse_args(["--token-padding-gap", "256",
                                          "--max-num-batched-tokens", "1024",
                                          "--no-async-scheduling",
                                          "--kv-cache-dtype", "fp8_e5m2",
                                          "--calculate-kv-scales",
                                          "--speculative-config",
                                          '{"method": "ngram", "num_speculative_tokens": 2}']))
    assert args.token_padding_gap == 256 and args.max_num_batched_tokens == 1024
    cfg = args.create_engine_config(platform="cpu", model_max_len=2048)
    assert cfg.scheduler_config.token_padding_gap == 256
    assert not cfg.scheduler_config.async_scheduling
    assert cfg.cache_config.kv_cache_dtype == "fp8_e5m2"
    assert cfg.cache_config.calculate_kv_scales
    assert cfg.speculative_config.num_speculative_tokens == 2
    for bad in ("ngram", "[1]"):  # not JSON / not an object: argparse's clear error
        with pytest.raises(SystemExit):
            p.parse_args(["--speculative-config", bad])
    default = cli._engine_args(p.parse_args([])).create_engine_config(platform="gpu",
                                                                      model_max_len=2048)
    assert default.scheduler_config.async_scheduling  # on by default (engine.md, H200)


def test_block_size_default_per_platform():
    # GPUs get 64-token pages unless told (measured faster there, GPU_BLOCK_SIZE), the rest 16.
    from jaxpage.config import GPU_BLOCK_SIZE, EngineArgs

    page = {p: EngineArgs().create_engine_config(platform=p, model_max_len=2048)
            .cache_config.page_size for p in ("gpu", "cpu", "tpu")}
    assert page == {"gpu": GPU_BLOCK_SIZE, "cpu": 16, "tpu": 16} and GPU_BLOCK_SIZE == 64
    for p in ("gpu", "cpu"):
        assert EngineArgs(block_size=32).create_engine_config(
            platform=p, model_max_len=2048).cache_config.page_size == 32


def test_bad_token_padding_gap_is_a_clear_error(default_gguf):
    proc = _run("generate", "hi", "--token-padding-gap", "100")
    assert proc.returncode == 2 and "token_padding_gap" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_convert_then_generate_from_the_checkpoint(default_gguf, tmp_path):
    """`jaxpage convert` writes the default model as a checkpoint that `--model` takes, and
    greedy text from it is the GGUF's (float32 stored: the same weights)."""
    out = tmp_path / "smol"
    proc = _run("convert", "default", str(out), "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and (out / "jaxpage_checkpoint.json").is_file()
    texts = []
    for model in ("default", str(out)):
        proc = _run("generate", "The capital of France is", "--model", model, "--max-tokens", "12")
        assert proc.returncode == 0, proc.stderr
        texts.append(proc.stdout)
    assert texts[0] == texts[1] and len(texts[0].strip()) > 10
    again = _run("convert", "default", str(out))
    assert again.returncode == 2 and "not an empty directory" in again.stderr
    assert "Traceback" not in again.stderr


def test_auto_tool_choice_needs_a_parser():
    proc = _run("serve", "--enable-auto-tool-choice", timeout=120)
    assert proc.returncode == 2 and "--tool-call-parser" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run("serve", "--tool-call-parser", "nope", timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
