"""Noise schedules and sampling grids vs diffusers' schedulers (betas, ᾱ, timesteps, sigmas, initial noise scale)."""
import itertools
import math

import pytest
import torch

from fastldm.schedules import NoiseSchedule, exponential_sigmas, karras_sigmas, spaced_timesteps

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # numpy 2 vs diffusers

# SD 1.5's scheduler_config.json (it has no timestep_spacing: each diffusers class then uses its own default).
SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "clip_sample": False, "trained_betas": None}


@pytest.fixture(scope="module")
def schedulers():
    d = pytest.importorskip("diffusers")
    return {"ddim": (d.DDIMScheduler,), "discrete": (d.EulerDiscreteScheduler, d.HeunDiscreteScheduler),
            "multistep": (d.DPMSolverMultistepScheduler, d.UniPCMultistepScheduler), "lcm": (d.LCMScheduler,),
            "ancestral": d.EulerAncestralDiscreteScheduler}


@pytest.mark.parametrize("cfg", [
    SD15,
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist()},
    {"num_train_timesteps": 500, "beta_schedule": "scaled_linear"},
], ids=["sd15", "linear", "cosine", "trained", "T500"])
def test_alphas_cumprod_match_diffusers(schedulers, cfg):
    ref = schedulers["ddim"][0].from_config(cfg).alphas_cumprod
    assert torch.equal(NoiseSchedule.from_config(cfg).alphas_cumprod, ref)


@pytest.mark.parametrize("class_name", ["DDIMScheduler", "HeunDiscreteScheduler", "LCMScheduler"])
def test_missing_beta_keys_take_the_config_class_defaults(schedulers, class_name):
    import diffusers
    ref = getattr(diffusers, class_name).from_config({"_class_name": class_name}).alphas_cumprod
    assert torch.equal(NoiseSchedule.from_config({"_class_name": class_name}).alphas_cumprod, ref)


def test_config_keys_kept_or_left_to_the_sampler():
    s = NoiseSchedule.from_config(SD15)
    assert (s.prediction_type, s.timestep_spacing, s.steps_offset, s.set_alpha_to_one) == ("epsilon", None, 1, False)
    s = NoiseSchedule.from_config(SD15 | {"timestep_spacing": "trailing", "prediction_type": "v_prediction"})
    assert (s.prediction_type, s.timestep_spacing) == ("v_prediction", "trailing")


@pytest.mark.parametrize("bad, word", [({"beta_schedule": "quadratic"}, "beta_schedule"),
                                       ({"prediction_type": "flow"}, "prediction_type"),
                                       ({"timestep_spacing": "even"}, "timestep_spacing"),
                                       ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr")])
def test_bad_config_is_a_one_line_error(bad, word):
    with pytest.raises(ValueError, match=word) as e:
        NoiseSchedule.from_config(SD15 | bad)
    assert "\n" not in str(e.value)


def _reference_grid(scheduler, family: str, n: int):
    """(sigmas, timesteps) of a diffusers scheduler after set_timesteps(n), one entry per sampler step."""
    scheduler.set_timesteps(n)
    t = scheduler.timesteps.double()
    if family in ("ddim", "lcm"):
        ac = scheduler.alphas_cumprod
        if family == "ddim":
            ac_end = scheduler.final_alpha_cumprod if t[-1] - 1000 // n < 0 else ac[int(t[-1]) - 1000 // n]
        else:
            ac_end = torch.tensor(1.0)
        acs = torch.cat([ac[scheduler.timesteps], ac_end.reshape(1)])
        return ((1 - acs) / acs) ** 0.5, t
    sigmas = scheduler.sigmas
    if scheduler.order == 2:  # Heun stores every inner sigma/timestep twice
        sigmas, t = torch.cat([sigmas[:1], sigmas[1::2]]), torch.cat([t[:1], t[1::2]])
    return sigmas, t


GRID_CASES = [(fam, sp, kind, n) for fam, sp, kind, n in itertools.product(
    ["ddim", "discrete", "multistep", "lcm"], ["leading", "linspace", "trailing"], ["default", "karras", "exponential"],
    [1, 3, 10, 16])  # 10 and 16 hit round-half-even ties (DPM linspace 499.5, trailing 937.5)
    if kind == "default" or fam in ("discrete", "multistep")]


@pytest.mark.parametrize("family, spacing, kind, n", GRID_CASES)
def test_grid_matches_diffusers(schedulers, family, spacing, kind, n):
    extra = {"use_karras_sigmas": kind == "karras", "use_exponential_sigmas": kind == "exponential"}
    for cls in schedulers[family]:
        kw = {"timestep_spacing": spacing} | (extra if family in ("discrete", "multistep") else {})
        ref = cls.from_config(SD15, **kw)
        sigmas, t = _reference_grid(ref, family, n)
        grid = NoiseSchedule.from_config(SD15).grid(n, family, spacing, kind)
        # float32 tables on both sides: sigmas agree to 1 ulp; timesteps exactly, or to 1 float32 ulp at t≈1000
        # (6e-5) where diffusers interpolates fractional timesteps (Euler linspace, Karras/exponential).
        torch.testing.assert_close(grid.sigmas, sigmas.float(), rtol=2e-7, atol=0)
        torch.testing.assert_close(grid.timesteps.double(), t, rtol=0, atol=1e-4)
        if family == "discrete":
            assert grid.noise_scale == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_euler_ancestral_grid_and_init_noise(schedulers, spacing):
    ref = schedulers["ancestral"].from_config(SD15, timestep_spacing=spacing)
    ref.set_timesteps(9)
    grid = NoiseSchedule.from_config(SD15).grid(9, "discrete", spacing)
    assert torch.equal(grid.sigmas, ref.sigmas) and torch.equal(grid.timesteps, ref.timesteps.float())
    assert grid.noise_scale == float(ref.init_noise_sigma)


def test_ddim_alpha_to_one_default():
    """Without set_alpha_to_one in the config DDIM ends at ᾱ=1 (σ=0), diffusers' DDIMScheduler default."""
    cfg = {k: v for k, v in SD15.items() if k != "set_alpha_to_one"}
    assert NoiseSchedule.from_config(cfg).grid(5, "ddim", "leading").sigmas[-1] == 0
    assert NoiseSchedule.from_config(SD15).grid(5, "ddim", "leading").sigmas[-1] == pytest.approx(0.0292, abs=1e-4)


def test_sigma_t_round_trip():
    s = NoiseSchedule.from_config(SD15)
    t = torch.arange(0, 1000, 37, dtype=torch.float64)
    assert torch.equal(s.t_to_sigma(t).float(), s.sigmas[t.long()])
    # log-σ interpolation inverts the table at integer t up to float32 rounding of σ (|dt| ≲ 1e-7/|dlogσ/dt|).
    torch.testing.assert_close(s.sigma_to_t(s.sigmas[t.long()]), t, rtol=0, atol=2e-4)
    assert s.sigma_to_t(torch.tensor([1e-6, 1e6])).tolist() == [0.0, 999.0]


def test_karras_and_exponential_sigmas():
    k = karras_sigmas(5, 0.1, 10.0)
    assert k[0] == pytest.approx(10.0) and k[-1] == pytest.approx(0.1)
    steps = k ** (1 / 7)                                       # uniform in σ^(1/ρ), Karras et al. eq. 5
    torch.testing.assert_close(steps.diff(), steps.diff()[:1].expand(4), rtol=1e-12, atol=0)
    e = exponential_sigmas(5, 0.1, 10.0)
    torch.testing.assert_close(e.log().diff(), torch.full((4,), math.log(0.1 / 10) / 4, dtype=torch.float64))


def test_spacing_formulas():
    """The examples of ecosystem notes §4.2 (50 steps: leading 981..1, trailing 999..19)."""
    lead = spaced_timesteps(1000, 50, "leading", 1)
    assert lead[:2].tolist() == [981, 961] and lead[-1] == 1
    trail = spaced_timesteps(1000, 50, "trailing")
    assert trail[:2].tolist() == [999, 979] and trail[-1] == 19
    assert spaced_timesteps(1000, 4, "linspace", integer=False).tolist() == [999, 666, 333, 0]
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(1000, 4, "uniform")


def test_grid_argument_errors():
    s = NoiseSchedule.from_config(SD15)
    for args, word in [((0, "discrete", "linspace"), "steps"), ((5, "pndm", "linspace"), "family"),
                       ((5, "discrete", "linspace", "beta"), "sigma"), ((60, "lcm", "leading"), "LCM")]:
        with pytest.raises(ValueError, match=word):
            s.grid(*args)
