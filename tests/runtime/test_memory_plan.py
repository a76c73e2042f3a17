"""The memory planner (runtime/memory_plan.py) and what it drives: plan choices by mode and budget, refusal before
any work, sequential CFG, 16-bit weights widened per layer, staged residency (RSS measured in a subprocess)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastldm
from fastldm.errors import MemoryBudgetError, SettingError
from fastldm.families import PRESETS
from fastldm.request import GenerationRequest
from fastldm.runtime.memory_plan import MemoryPlanner, MiB, model_facts, parse_bytes
from fastldm.testing import save_random_folder, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
GiB = 1 << 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_random_folder("tiny:sd1", tmp_path_factory.mktemp("plan") / "m", dtype=torch.float32)


# ---- plan choices -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15():
    return PRESETS["sd1"]


@pytest.fixture(scope="module")
def planner(sd15):
    """MemoryPlanner(sd15, ...) sharing one ModelFacts (a meta-device trace of the full-size UNet)."""
    facts = model_facts(sd15)
    return lambda *args, **kw: MemoryPlanner(sd15, *args, facts=facts, **kw)


def test_parse_bytes():
    assert parse_bytes("2.1GB") == int(2.1 * GiB) and parse_bytes("512M") == 512 * MiB and parse_bytes(7) == 7
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(SettingError):
            parse_bytes(bad)


def test_fast_and_balanced_change_nothing_at_512(planner):
    """Today's default: everything resident in the compute dtype, one UNet call per step, untiled VAE."""
    for mode in ("fast", "balanced", None):
        plan = planner(mode).plan
        assert plan.level == 1 and plan.staged == () and plan.unet_batch is None and plan.vae_tile is None
        assert all(s == "fp32" for _, s in plan.storage)


def test_smaller_budgets_reach_further_levers(planner):
    """Each smaller budget gives a plan at the same or a later level, and every chosen plan fits its budget."""
    levels = []
    for budget in ("16GB", "6GB", "4GB", "3GB", "2.6GB"):
        plan = planner(budget=budget).plan
        assert plan.fits(), plan.describe()
        levels.append(plan.level)
    assert levels == sorted(levels) and levels[0] == 1 and levels[-1] >= 4


def test_budget_plan_levers(planner):
    """The ladder's content: a 4 GB budget stages the text encoders (fp32 weights are 4,067 MB); 3 GB needs
    16-bit weights; the smallest plan stages everything and runs CFG as two calls."""
    p4 = planner(budget="4.6GB").plan
    assert "text_encoder" in p4.staged and dict(p4.storage)["unet"] == "fp32"
    p3 = planner(budget="3GB").plan
    assert dict(p3.storage)["unet"] == "fp16 -> fp32"
    low = planner("low").plan
    assert set(low.staged) == {"text_encoder", "unet", "vae"} and low.sequential_cfg and low.vae_tile
    assert low.peak < p3.peak < p4.peak


def test_big_images_get_tiled_and_sequential(planner):
    budgeted = planner(budget="3GB")
    small, big = budgeted.for_request(512, 512, 1, True), budgeted.for_request(1280, 1280, 1, True)
    assert small.unet_batch is None and small.fits()
    assert big.vae_tile is not None and big.sequential_cfg and big.fits()
    with pytest.raises(MemoryBudgetError):
        budgeted.for_request(2048, 2048, 1, True)
    # balanced without a budget tiles only what would not fit the machine
    assert planner(machine_bytes=8 * GiB).for_request(2048, 2048, 1, True).vae_tile is not None
    assert planner(machine_bytes=8 * GiB).for_request(512, 512, 1, True).vae_tile is None
    assert planner("fast", machine_bytes=8 * GiB).for_request(2048, 2048, 1, True).vae_tile is None


def test_winograd_is_given_up_after_staging_and_before_16_bit_weights(planner):
    """Where tuning runs the full-resolution convolutions as Winograd, plans keep them (and count their fp32
    transformed weights: 4× SD 1.5's 63 MiB of full-resolution 3×3 weights, in fp32) through level 3, then drop
    them before widening 16-bit weights; "low" and int8 never hold them."""
    facts = model_facts(PRESETS["sd1"])
    assert facts.winograd_channels[0] == 960 + 320 and 250 * MiB < 16 * facts.winograd_weights[0] < 256 * MiB
    plain, wino = planner().plan, planner(winograd=1).plan
    assert (plain.winograd, wino.winograd) == (0, 16 * facts.winograd_weights[0]) and wino.level == 1
    # the denoise peak grows by the transformed weights and one layer's V and M (36 · 512 tiles · 1,280 · 4 B)
    grown = dict(wino.peaks)["denoise"] - dict(plain.peaks)["denoise"]
    assert grown >= wino.winograd + 36 * 512 * 1280 * 4 and "Winograd" in wino.describe()
    assert dict(wino.peaks)["decode"] - dict(plain.peaks)["decode"] == wino.winograd  # the UNet stays resident
    # Under budgets: the text encoders are staged before Winograd is given up, and it is given up before the
    # weights go to 16 bits (4.6 GB: level 2, the UNet resident through the decode).
    l2 = planner(budget="4.6GB").plan
    staged = planner(budget=l2.peak + wino.winograd + 16 * MiB, winograd=1)
    assert staged.winograd_levels == 1 and staged.plan.level == 2 and staged.plan.fits()
    # Budgets falling in 64 MiB steps walk the ladder in order: Winograd is kept through levels 1-3 while they
    # fit (tiling the VAE where that suffices), then level 3 runs without it, then 16-bit weights; never back.
    walk = []
    for budget in range(int(wino.peak) + 64 * MiB, 2 * GiB, -64 * MiB):
        chosen = planner(budget=budget, winograd=1)
        assert chosen.plan.fits()
        walk.append((chosen.plan.level, not chosen.winograd_levels))
    assert walk == sorted(walk, key=lambda s: (s[1], s[0])) and walk[0] == (1, False)
    assert {(2, False), (3, True), (4, True)} <= set(walk)
    assert planner(budget="3GB", winograd=1).plan.winograd == 0          # 16-bit weights: none
    assert not planner("low", winograd=1).winograd_levels
    assert not planner(quant="int8", winograd=1).winograd_levels


def test_winograd_at_deeper_levels_fits_beside_16_bit_weights_only(planner):
    """Where tuning measured the deeper convolutions faster too, a bf16 SD 1.5 holds F(2×2)'s bf16 transforms
    (16/9 of a bf16 weight) for its first three levels of four (0.90 GiB: its weights and every transform stay
    within its fp32 weights' 3.2 GiB; the fourth would take 1.73 GiB); an fp32 one keeps only the
    full-resolution ones (F(4×4), fp32). Budgets give up the deepest first, at level 3."""
    facts = model_facts(PRESETS["sd1"])
    assert facts.winograd_channels[1] == 1920 + 640 and len(facts.winograd_weights) == 4
    assert planner(winograd=4).winograd_levels == 1                             # fp32
    one, three = (planner(compute=torch.bfloat16, winograd=n) for n in (1, 4))
    assert three.winograd_levels == 3 and three.plan.winograd == 32 * sum(facts.winograd_weights[:3]) // 9
    assert 0.89 * GiB < three.plan.winograd < 0.91 * GiB and one.plan.winograd == 32 * facts.winograd_weights[0] // 9
    # the denoise peak grows by the deeper transforms (the V and M buffers are the full-resolution layer's)
    assert dict(three.plan.peaks)["denoise"] - dict(one.plan.peaks)["denoise"] >= three.plan.winograd - one.plan.winograd
    assert "the first 3 levels' convs" in three.plan.describe()
    walk = []
    for budget in range(int(three.plan.peak) + 64 * MiB, 2 * GiB, -64 * MiB):
        chosen = planner(compute=torch.bfloat16, budget=budget, winograd=4)
        assert chosen.plan.fits()
        walk.append((chosen.plan.level, -chosen.winograd_levels))
    assert walk == sorted(walk, key=lambda s: (s[1], s[0])) and walk[0] == (1, -3)
    assert {(2, -3), (3, -2), (3, 0)} <= set(walk), walk


def test_int8_winograd_weights_are_counted(planner):
    """An int8 UNet whose 3×3 convolutions run as int8 Winograd F(2×2) holds 16/9 of their int8 weights: 7/9 byte
    more per weight element (SD 1.5: 521M elements, +0.38 GiB); no transforms are counted for a float UNet."""
    facts = model_facts(PRESETS["sd1"])
    plain, wino = planner(quant="int8"), planner(quant="int8", int8_winograd=True)
    more = 7 * sum(facts.winograd_weights) // 9
    assert 0.37 * GiB < more < 0.39 * GiB
    for stage in ("load", "denoise", "decode"):
        assert dict(wino.plan.peaks)[stage] - dict(plain.plan.peaks)[stage] == more
    assert planner(int8_winograd=True).plan.peaks == planner().plan.peaks


def test_reference_attention_counts_its_scores(planner):
    fused = planner().for_request(512, 512, 1, True)
    ref = planner(attention="reference").for_request(512, 512, 1, True)
    # 2 rows · 8 heads · 4096² · 4 B = 1 GiB of scores at the first level
    assert dict(ref.peaks)["denoise"] - dict(fused.peaks)["denoise"] >= GiB
    assert "reference" in ref.attention


# ---- refusal before start -----------------------------------------------------------------------------------

def test_refused_before_any_work(folder):
    pipe = fastldm.load(folder, tune=False, memory_budget="400MB")
    pipe.plan(GenerationRequest("ok", width=16, height=16))        # fits
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(MemoryBudgetError) as e:
        pipe.generate("too big", width=2048, height=2048, steps=1)
    assert e.value.budget == 400 * MiB and e.value.needed > e.value.budget
    assert f"{e.value.needed:,} bytes" in str(e.value) and "400 MiB" in str(e.value)
    assert calls == [] and all(n == 0 for n in pipe.residency.loads.values())


def test_unknown_mode_is_a_setting_error(folder):
    with pytest.raises(SettingError, match="memory mode"):
        fastldm.load(folder, tune=False, memory="tiny")


# ---- the plan at work: sequential CFG, 16-bit weights, staging ----------------------------------------------

# fp32, batch 1 vs 2 rows per UNet call: only the GEMMs' row blocking changes (see tests/test_run.py BOUND).
BOUND = 1 / 255


def test_sequential_cfg_equals_batched(folder):
    pipe = fastldm.load(folder, tune=False)
    req = GenerationRequest("a red cube", steps=2, seed=4, guidance=6.0, n=2, width=16, height=16)
    batched = pipe.generate(req)
    plan = pipe.plan(req)
    seq_plan = dataclasses.replace(plan, memory=dataclasses.replace(plan.memory, unet_batch=2))
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        seq = fastldm.run.run(pipe, [seq_plan])[0]
    finally:
        handle.remove()
    assert calls == [2, 2] * 2          # uncond of both images, then cond of both, every step
    assert float(np.abs(seq.raw - batched.raw).max()) <= BOUND


def test_low_plan_equals_fp32_on_rounded_weights(folder, tmp_path):
    """The low plan (16-bit weights widened per layer, staged components, sequential CFG, tiled VAE) gives the
    image of the default plan run on the fp16-rounded checkpoint (up to batch and tile rounding)."""
    rounded = save_random_folder("tiny:sd1", tmp_path / "r", dtype=torch.float16)  # same seed: the same weights
    req = GenerationRequest("a blue sphere", steps=3, seed=2, guidance=5.0)
    want = fastldm.load(rounded, tune=False, dtype="fp32").generate(req)
    low = fastldm.load(folder, tune=False, memory="low")
    got = low.generate(req)
    assert float(np.abs(got.raw - want.raw).max()) <= BOUND
    assert low.residency.loads == {"text_encoder": 1, "vae": 1, "unet": 1}
    assert not any(low.residency.loaded(n) for n in ("text_encoder", "unet", "vae"))  # all released after the run
    again = low.generate(req)
    assert np.array_equal(again.raw, got.raw) and low.residency.loads["unet"] == 2


# ---- staged residency frees memory (RSS, subprocess) -------------------------------------------------------

_RSS = textwrap.dedent("""
    import json, sys, torch, fastldm
    from fastldm.request import GenerationRequest

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

    pipe = fastldm.load(sys.argv[1], tune=False, **json.loads(sys.argv[2]))
    out = {"start": rss()}
    pipe.encode_prompt(["a red cube"])
    out["encoded"] = rss()
    pipe.acquire("unet")
    out["unet"] = rss()
    pipe.generate(GenerationRequest("a red cube", steps=1, seed=0))
    out["after_run"] = rss()
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def big_text_folder(tmp_path_factory):
    """Tiny UNet and VAE, a ~50 M-parameter text encoder (~100 MB in fp16): its release shows in the RSS."""
    c = tiny_config("sd1")
    te = dataclasses.replace(c.text_encoder, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                             num_attention_heads=8)
    config = c.replace(text_encoder=te, unet=dataclasses.replace(c.unet, cross_attention_dim=512))
    return save_random_folder(config, tmp_path_factory.mktemp("big") / "m", dtype=torch.float16)


def _rss(folder, **load) -> dict:
    p = subprocess.run([sys.executable, "-c", _RSS, str(folder), json.dumps(load)], capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_staged_text_encoder_is_released(big_text_folder):
    te_bytes = 50e6 * 2   # fp16 weights, widened per layer
    staged = _rss(big_text_folder, memory="low")
    assert staged["encoded"] - staged["start"] > 0.8 * te_bytes        # loaded for the encoding
    assert staged["encoded"] - staged["unet"] > 0.8 * te_bytes         # released before the denoise
    assert staged["after_run"] - staged["start"] < 0.3 * te_bytes      # nothing of it kept after a run
    resident = _rss(big_text_folder)
    assert resident["start"] - staged["start"] > 1.5 * te_bytes        # fp32, loaded up front ...
    assert abs(resident["unet"] - resident["encoded"]) < 0.2 * te_bytes  # ... and kept


# ---- front ends ---------------------------------------------------------------------------------------------

def test_cli_budget_refuses_with_the_bytes_and_low_generates(folder, tmp_path):
    from click.testing import CliRunner

    from fastldm.cli import main

    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["generate", "x", "--model", str(folder), "--steps", "1", "--threads", "1",
                                    "--memory-budget", "100MB", "--out", str(out)])
    assert res.exit_code == MemoryBudgetError.exit_code and "more than the memory budget of 100 MiB" in res.output
    assert not out.exists()
    res = CliRunner().invoke(main, ["generate", "x", "--model", str(folder), "--steps", "1", "--threads", "1",
                                    "--memory", "low", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("*.png"))) == 1
    res = CliRunner().invoke(main, ["info", str(folder), "--memory-budget", "2GB"])
    assert res.exit_code == 0 and "memory plan:     balanced, budget 2,048 MiB" in res.output
    assert "predicted peak (16x16, n=1, guided)" in res.output


def test_serve_settings_pass_the_memory_options():
    from fastldm.serve.settings import Settings

    assert Settings().load_options == {"device": "cpu", "dtype": None}
    assert Settings(memory="low", memory_budget=3 * GiB).load_options == {
        "device": "cpu", "dtype": None, "memory": "low", "memory_budget": 3 * GiB}


def test_an_fp16_plan_counts_the_vae_in_the_dtype_it_runs_in():
    """In fp16, SDXL's VAE runs in fp32 (families.vae_dtype) and SD 1.5's in fp16: the weights and the decode
    are predicted in those dtypes (the decode's tensors twice as large in fp32)."""
    sdxl, sd15 = tiny_config("sdxl"), tiny_config("sd1")
    xl = MemoryPlanner(sdxl, compute=torch.float16, device="cuda", machine_bytes=80 << 30)
    sd = MemoryPlanner(sd15, compute=torch.float16, device="cuda", machine_bytes=80 << 30)
    assert xl.storage()["vae"] == "fp32" and xl.storage()["unet"] == "fp16" and sd.storage()["vae"] == "fp16"
    xl16 = MemoryPlanner(dataclasses.replace(sdxl, vae=dataclasses.replace(sdxl.vae, force_upcast=False)),
                         compute=torch.float16, device="cuda", machine_bytes=80 << 30)
    decode = {p: dict(p.for_request(256, 256, 1, guided=True).peaks)["decode"] for p in (xl, xl16)}
    weights = xl.facts.weight_bytes("vae", "fp32") - xl.facts.weight_bytes("vae", "fp16")
    assert decode[xl] > decode[xl16] + weights


def test_model_facts_are_measured_once_per_config_then_read(monkeypatch, tmp_path):
    from fastldm.runtime import memory_plan

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sd1, xl = tiny_config("sd1"), tiny_config("sdxl")
    first = model_facts(sd1)
    files = list((tmp_path / "fastldm" / "facts").glob("*.json"))
    assert len(files) == 1 and first == memory_plan.measure_facts(sd1)
    measure = memory_plan.measure_facts
    monkeypatch.setattr(memory_plan, "measure_facts", lambda config: pytest.fail("measured again"))
    assert model_facts(sd1) == first
    monkeypatch.setattr(memory_plan, "measure_facts", measure)
    assert model_facts(xl) != first and len(list(files[0].parent.glob("*.json"))) == 2
    files[0].write_text("{not json")             # a damaged entry is measured again and rewritten
    assert model_facts(sd1) == first and json.loads(files[0].read_text())["matrix"] == first.matrix
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    (tmp_path / "file").write_text("")           # no cache folder can be made there: measured, not stored
    assert model_facts(sd1) == first


def test_a_cuda_plan_fits_the_gpu_and_matches_its_measurement(planner, monkeypatch):
    """On CUDA the machine is the GPU: a balanced plan tiles the decode once the untiled one would not fit its
    memory. The decode's prediction sits just above what an H200 allocated (SD 1.5, 512², fp16: 546 MB above
    the weights; docs/benchmarks.md), not below it."""
    gpu = planner(compute=torch.float16, device="cuda", machine_bytes=8 << 30)
    assert gpu.for_request(512, 512, 1, guided=True).vae_tile is None
    big = gpu.for_request(2048, 2048, 1, guided=True)
    assert big.vae_tile is not None and big.peak <= 8 << 30
    assert planner(compute=torch.float16, device="cuda", machine_bytes=80 << 30).for_request(
        2048, 2048, 1, guided=True).vae_tile is None
    weights = sum(gpu.facts.weight_bytes(c, "fp16") for c in gpu.facts.matrix)
    decode = dict(gpu.for_request(512, 512, 1, guided=True).peaks)["decode"] - weights
    assert 546 * MiB <= decode <= 1.25 * 546 * MiB, decode / MiB
    # Made without machine_bytes: the GPU's free memory plus what this process already holds there.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 << 30, 24 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1 << 30)
    assert planner(compute=torch.float16, device="cuda").machine_bytes == 7 << 30
