"""finetune() under torchrun on the CPU (gloo): 2 processes give the single-process result.

The multi-process runs launch ``tests/train/scripts/dist_finetune.py`` with
``python -m torch.distributed.run --nproc_per_node 2`` on the tiny 4-bit Llama. That script calls
the steps of finetune() one by one so that each rank can dump the LoRA weights it ends with.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alpaca_lora import ConfigError
from alpaca_lora.train.distributed import (
    Dist,
    LaunchEnv,
    check_world_size,
    global_step_shard,
    init_distributed,
    launch_env,
)
from alpaca_lora.train.recipe import finetune
from alpaca_lora.train.strategy import FullyShardedStrategy, Strategy, choose_strategy

SCRIPT = Path(__file__).parent / "scripts" / "dist_finetune.py"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
RECORDS = [{"instruction": f"Item {i}: repeat the word.", "input": w, "output": f"{w} {w}"}
           for i, w in enumerate(WORDS)]
# 11 records, 2 held out: 9 train records = 5 micro-batches of 2 -> steps of 4 and 1 micro-batch, so
# the second step of every epoch leaves rank 1 with no micro-batch at all.
CONFIG = dict(batch_size=8, micro_batch_size=2, learning_rate=2e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0,
              val_set_size=2, warmup_ratio=0.0, cutoff_len=64, gradient_checkpointing=False, max_steps=6,
              save_steps=2, eval_steps=3, device="cpu", compute_dtype="float32")  # other dtypes: the test below
# Measured: losses agree to ~5e-8 relative; adapters to 2.3e-4 (DDP) and 2.0e-4 (FSDP) of weights up
# to 0.16 after 6 AdamW steps at lr 2e-2: gradients differ only by float summation order, which
# Adam's normalisation amplifies for near-zero gradient entries. A dropped or doubled micro-batch
# moves the first loss by > 1e-2 and the weights by ~lr per step.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, model_dir: Path, config: dict, *extra: str, accelerate_config: Path | None = None,
            timeout: float = 240, records: list[dict] = RECORDS) -> tuple[int, str, float]:
    """Run the script in 2 processes with torchrun, or with accelerate launch and ``accelerate_config``."""
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"config": config, "records": records}))
    (tmp / "dump").mkdir(exist_ok=True)
    if accelerate_config is None:
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                    "--master_port", str(_free_port())]
    else:
        launcher = ["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                    "--main_process_port", str(_free_port())]
    cmd = [sys.executable, *launcher, str(SCRIPT), str(model_dir), str(tmp / "out"), str(tmp / "dump"), str(spec),
           *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def _losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---- launch detection, sharding, validation (no processes) ------------------------------------------


def test_launch_env_reads_torchrun_and_accelerate_variables():
    assert launch_env({}) == LaunchEnv(0, 1, 0)
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert launch_env(torchrun) == LaunchEnv(3, 4, 1)
    # accelerate launch (multi-process) starts its workers through torchrun's launcher: same
    # variables plus its own ACCELERATE_* ones; an FSDP config adds ACCELERATE_USE_FSDP=true.
    accelerate = {**torchrun, "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": "true",
                  "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}
    assert launch_env(accelerate) == LaunchEnv(3, 4, 1)
    assert isinstance(choose_strategy(False, Dist(LaunchEnv(), torch.device("cpu"), None, False), accelerate),
                      FullyShardedStrategy)
    assert type(choose_strategy(False, Dist(LaunchEnv(), torch.device("cpu"), None, False), torchrun)) is Strategy
    with pytest.raises(ConfigError, match="RANK=4 WORLD_SIZE=4"):
        launch_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        launch_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_single_process_dist_is_transparent():
    dist = init_distributed("cpu", environ={})
    assert not dist.enabled and dist.is_main and dist.world_size == 1 and dist.device.type == "cpu"
    assert dist.sum([1, 2.5]) == [1.0, 2.5]
    with pytest.raises(ValueError, match="boom"), dist.guard("anything"):
        raise ValueError("boom")


def test_step_shards_cover_the_step_once_in_the_global_order():
    step = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    shards = [global_step_shard(Dist(LaunchEnv(r, 2, r), torch.device("cpu"), "gloo", False), step) for r in (0, 1)]
    assert [mb for mb, _ in shards[0]] == [[0, 1], [4, 5], [8]] and [mb for mb, _ in shards[1]] == [[2, 3], [6, 7]]
    padded = [global_step_shard(Dist(LaunchEnv(r, 2, r), torch.device("cpu"), "gloo", False), step, pad=True)
              for r in (0, 1)]
    assert len(padded[0]) == len(padded[1]) == 3  # FSDP: the same number of passes on every rank
    assert padded[1][-1] == ([0, 1], False)  # the filler pass does not count
    counted = sorted(i for shard in padded for mb, c in shard if c for i in mb)
    assert counted == list(range(9))


def test_global_batch_must_split_evenly_over_processes():
    two = Dist(LaunchEnv(0, 2, 0), torch.device("cpu"), "gloo", False)
    check_world_size(two, batch_size=8, micro_batch_size=2)  # 4 micro-batches, 2 per rank
    with pytest.raises(ConfigError, match=r"batch_size=6 with micro_batch_size=2 .* 3 micro-batches .* batch_size=4"):
        check_world_size(two, batch_size=6, micro_batch_size=2)


def test_fixed_gpu_under_a_multi_process_launch_is_refused():
    with pytest.raises(ConfigError, match="device='cuda:1' with 2 processes"):
        init_distributed("cuda:1", environ={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


# ---- torchrun, 2 processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = finetune(tiny_model_dir, RECORDS, out, **CONFIG)
    return result, out


@pytest.fixture(scope="module")
def ddp(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    rc, log, _ = _launch(tmp, tiny_model_dir, CONFIG)
    assert rc == 0, log[-4000:]
    return tmp


@pytest.mark.slow
def test_two_processes_write_one_complete_output_folder(ddp):
    out = ddp / "out"
    assert [p.name for p in out.glob("adapter_model*")] == ["adapter_model.safetensors"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written checkpoint
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # rank 1 logged nothing
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert len(load_file(str(out / "adapter_model.safetensors"))) == 2 * 4 * 2


@pytest.mark.slow
def test_every_rank_ends_with_the_same_adapter(ddp):
    ranks = [load_file(str(ddp / "dump" / f"rank{r}.safetensors")) for r in (0, 1)]
    assert _max_diff(ranks[0], ranks[1]) == 0.0
    assert _max_diff(ranks[0], load_file(str(ddp / "out" / "adapter_model.safetensors"))) == 0.0
    infos = [json.loads((ddp / "dump" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert infos[0]["backend"] == "gloo" and infos[0]["world_size"] == 2
    same = [k for k in infos[0] if k not in ("rank", "data_cache_hit")]  # rank 1 reads the table rank 0 wrote
    assert {k: infos[0][k] for k in same} == {k: infos[1][k] for k in same}


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(ddp, single):
    result, out = single
    one, two = _losses(out), _losses(ddp / "out")
    info = json.loads((ddp / "dump" / "rank0.json").read_text())
    diff = _max_diff(load_file(str(out / "adapter_model.safetensors")),
                     load_file(str(ddp / "out" / "adapter_model.safetensors")))
    print(f"1 vs 2 processes: losses {one} vs {two}; max abs adapter diff {diff:.2e}")
    assert len(one) == len(two) == 6 and one[-1] < one[0]
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    assert info["eval_loss"] == pytest.approx(result.eval_loss, rel=LOSS_RTOL)
    assert info["tokens_seen"] == result.tokens_seen  # summed over ranks: the records a single process saw
    assert diff < WEIGHT_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_two_processes_match_one_process_in_every_precision(tiny_model_dir, tmp_path, dtype):
    """The precision matrix's row for scale-out: fp32, bf16 and fp16 (with its loss scale) in 1 and 2 processes."""
    config = {**CONFIG, "compute_dtype": dtype, "val_set_size": 0, "max_steps": 4, "save_steps": 100}
    one = finetune(tiny_model_dir, RECORDS, tmp_path / "one", **config)
    (tmp_path / "two").mkdir()
    rc, log, _ = _launch(tmp_path / "two", tiny_model_dir, config)
    assert rc == 0, log[-4000:]
    losses = (_losses(one.adapter_dir), _losses(tmp_path / "two" / "out"))
    diff = _max_diff(load_file(str(one.adapter_dir / "adapter_model.safetensors")),
                     load_file(str(tmp_path / "two" / "out" / "adapter_model.safetensors")))
    rows = [json.loads(line) for line in (tmp_path / "two" / "out" / "metrics.jsonl").read_text().splitlines()]
    print(f"1 vs 2 processes [{dtype}]: losses {losses[0]} vs {losses[1]}; max abs adapter diff {diff:.2e}")
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL)
    assert diff < WEIGHT_ATOL
    assert all(("loss_scale" in r) is (dtype == "float16") for r in rows if "loss" in r)


@pytest.mark.slow
def test_two_processes_match_one_process_on_conversations(tiny_model_dir, tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"Item {i}: repeat {w}."},
                           {"role": "assistant", "content": f"{w} {w}"},
                           {"role": "user", "content": "Once more."}, {"role": "assistant", "content": w}]}
             for i, w in enumerate(WORDS)]
    # lr 5e-3: Adam turns float summation-order noise in near-zero gradient entries into steps of ~lr
    config = {**CONFIG, "val_set_size": 0, "max_steps": 4, "save_steps": 100, "learning_rate": 5e-3}
    one = finetune(tiny_model_dir, chats, tmp_path / "one", **config)
    (tmp_path / "two").mkdir()
    rc, log, _ = _launch(tmp_path / "two", tiny_model_dir, config, records=chats)
    assert rc == 0, log[-4000:]
    losses = (_losses(one.adapter_dir), _losses(tmp_path / "two" / "out"))
    diff = _max_diff(load_file(str(one.adapter_dir / "adapter_model.safetensors")),
                     load_file(str(tmp_path / "two" / "out" / "adapter_model.safetensors")))
    print(f"1 vs 2 processes [conversations]: losses {losses[0]} vs {losses[1]}; max abs adapter diff {diff:.2e}")
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL)
    assert diff < WEIGHT_ATOL
    assert (tmp_path / "two" / "out" / "chat_template.jinja").is_file()


@pytest.mark.slow
def test_rank_0_tokenizes_and_the_other_rank_reads_its_cache_entry(tiny_model_dir, tmp_path):
    from alpaca_lora.data.token_cache import list_cache

    config = {**CONFIG, "max_steps": 2, "save_steps": 100, "data_cache_dir": str(tmp_path / "cache")}
    rc, log, _ = _launch(tmp_path, tiny_model_dir, config)
    assert rc == 0, log[-4000:]
    hits = [json.loads((tmp_path / "dump" / f"rank{r}.json").read_text())["data_cache_hit"] for r in (0, 1)]
    assert hits == [False, True]  # one process tokenized; the other memory-mapped its table
    assert len(list_cache(tmp_path / "cache" / "tokenized")) == 1


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank(tiny_model_dir, tmp_path):
    # Rank 1's collator raises on its third call (training step 3); rank 0 must not wait for it.
    rc, log, seconds = _launch(tmp_path, tiny_model_dir, CONFIG, "--fail-on-rank", "1", "--fail-at-call", "3",
                                 timeout=180)
    assert rc != 0
    assert "injected failure at collator call 3" in log
    assert "DistributedError: process rank 1 of 2 failed during training step 3" in log, log[-4000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "dump").iterdir())
    assert seconds < 120


@pytest.mark.slow
def test_fsdp_qlora_under_accelerate_launch_on_cpu_matches_one_process(tiny_model_dir, tmp_path, single):
    # accelerate launch with the example FSDP config: finetune() turns fsdp on from ACCELERATE_USE_FSDP,
    # stores the NF4 base in fp32 (the CPU compute dtype) and FSDP shards it over 2 gloo processes.
    result, out = single
    rc, log, _ = _launch(tmp_path, tiny_model_dir, CONFIG, accelerate_config=EXAMPLES / "accelerate_fsdp_qlora.yaml")
    assert rc == 0, log[-4000:]
    saved = json.loads((tmp_path / "out" / "finetune_config.json").read_text())
    assert saved["fsdp"] is True and saved["quantization"] == "nf4"
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # FSDP runs write no resumable checkpoints yet
    diff = _max_diff(load_file(str(out / "adapter_model.safetensors")),
                     load_file(str(tmp_path / "out" / "adapter_model.safetensors")))
    print(f"FSDP 2 processes vs 1 process: max abs adapter diff {diff:.2e}")
    assert _losses(tmp_path / "out") == pytest.approx(_losses(out), rel=LOSS_RTOL)
    assert diff < WEIGHT_ATOL
    assert json.loads((tmp_path / "dump" / "rank0.json").read_text())["eval_loss"] == pytest.approx(
        result.eval_loss, rel=LOSS_RTOL)
