"""Samplers and the denoiser.

1. Parity: every sampler's whole trajectory equals the matching diffusers scheduler run the way
   StableDiffusion(Img2Img)Pipeline runs it (scale_model_input, one batched CFG call at guidance 7.5, scheduler.step
   with the same generator), on the same tiny seeded UNet2DConditionModel, fp32.
2. Convergence on an analytic Gaussian denoiser (exact ODE solution / exact output distribution).
3. Registry, noise helper, CFG batching, early stop.
"""
import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

from fastldm.denoiser import Denoiser, guidance_embedding
from fastldm.samplers import (drive, list_samplers, list_schedulers, randn, resolve_sampler, sample, sample_ddim,
                              sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_euler, sample_euler_ancestral, sample_heun,
                              sample_lcm, sample_unipc)
from fastldm.schedules import NoiseSchedule, karras_sigmas

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # numpy 2 vs diffusers
              pytest.mark.usefixtures("one_thread")]

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "clip_sample": False}
B, GUIDANCE = 2, 7.5
# fp32 on both sides; what differs is only the rounding of algebraically equal formulas (σ-space vs VP latents,
# closed-form vs linalg.solve for UniPC): measured ≤ 3e-6 relative. A wrong timestep, order or noise draw is ≥ 1e-2.
RTOL = 1e-4


class Net:
    """A diffusers UNet2DConditionModel behind fastldm's `unet(x, t, **cond)` signature, counting its calls."""
    def __init__(self, unet):
        self.unet, self.batches = unet, []

    def __call__(self, x, t, encoder_hidden_states, timestep_cond=None):
        self.batches.append(x.shape[0])
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond).sample


def tiny_unet(**extra):
    import diffusers
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, sample_size=8,
        in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **extra).eval()


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("diffusers")
    g = torch.Generator().manual_seed(1)
    return SimpleNamespace(unet=tiny_unet(), cond=torch.randn(B, 5, 16, generator=g),
                           uncond=torch.randn(B, 5, 16, generator=g), noise=torch.randn(B, 4, 8, 8, generator=g),
                           init=torch.randn(B, 4, 8, 8, generator=g))


def diffusers_run(scheduler, net, tiny, steps, *, guidance=GUIDANCE, generator=None, eta=None, init=None,
                  strength=1.0, timestep_cond=None):
    """diffusers' StableDiffusion(Img2Img)Pipeline denoising loop; the latents after each complete step."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if init is None:
        latents = tiny.noise * scheduler.init_noise_sigma
    else:  # img2img: get_timesteps + add_noise
        start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[start * scheduler.order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        latents = scheduler.add_noise(init, tiny.noise, timesteps[:1].repeat(B))
    accepted = inspect.signature(scheduler.step).parameters
    kw = {k: v for k, v in {"generator": generator, "eta": eta}.items() if k in accepted and v is not None}
    cfg = guidance > 1 and timestep_cond is None
    context = torch.cat([tiny.uncond, tiny.cond]) if cfg else tiny.cond
    trajectory = []
    for k, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
        out = net(model_input, t, encoder_hidden_states=context, timestep_cond=timestep_cond)
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        latents = scheduler.step(out, t, latents, **kw).prev_sample
        if scheduler.order == 1 or k % 2 == 1 or k == len(timesteps) - 1:  # Heun: a step is two calls
            trajectory.append(latents)
    return trajectory


def fastldm_run(spec, cfg, net, tiny, steps, *, guidance=GUIDANCE, generator=None, init=None, strength=1.0, **kw):
    """fastldm's `sample`; the per-step latents in diffusers' space (σ-space for the Euler family, else VP)."""
    schedule = NoiseSchedule.from_config(cfg)
    den = Denoiser(net, schedule, {"encoder_hidden_states": tiny.cond}, {"encoder_hidden_states": tiny.uncond},
                   guidance, **kw)
    trajectory = []

    def record(info):
        x = info["x"]
        trajectory.append(x if spec.family == "discrete" else x / (1 + info["sigma_next"] ** 2) ** 0.5)

    out = sample(den, tiny.noise, spec, schedule, steps, generator=generator, callback=record,
                 init_latents=init, strength=strength)
    return trajectory, out


def assert_same_trajectory(ours, ref, final=None):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= RTOL, f"step {i}: relative error {err:.2e}"
    if final is not None:
        assert ((final - ref[-1]).abs().max() / ref[-1].abs().max()).item() <= RTOL


CASES = [  # id, fastldm name, scheduler, diffusers class, its settings, steps, prediction, extra
    ("ddim-leading", "DDIM", None, "DDIMScheduler", {}, 10, "epsilon", {}),
    ("ddim-trailing-v", "ddim", "trailing", "DDIMScheduler", {"timestep_spacing": "trailing"}, 5, "v_prediction", {}),
    ("ddim-eta1", "DDIM", None, "DDIMScheduler", {}, 6, "epsilon", {"eta": 1.0}),
    ("euler-linspace", "Euler", None, "EulerDiscreteScheduler", {}, 8, "epsilon", {}),
    ("euler-v", "euler", None, "EulerDiscreteScheduler", {}, 6, "v_prediction", {}),
    ("euler-config-leading", "Euler", None, "EulerDiscreteScheduler", {}, 6, "epsilon",
     {"config": {"timestep_spacing": "leading"}}),
    ("euler-karras", "Euler", "karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, 6, "epsilon", {}),
    ("euler_a", "Euler a", None, "EulerAncestralDiscreteScheduler", {}, 8, "epsilon", {"per_item_generators": True}),
    ("euler_a-trailing-v", "euler_ancestral", "sgm_uniform", "EulerAncestralDiscreteScheduler",
     {"timestep_spacing": "trailing"}, 6, "v_prediction", {}),
    ("heun", "Heun", None, "HeunDiscreteScheduler", {}, 5, "epsilon", {}),
    ("heun-karras-v", "heun", "karras", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, 4, "v_prediction", {}),
    ("dpmpp_2m", "DPM++ 2M", None, "DPMSolverMultistepScheduler", {}, 8, "epsilon", {}),
    ("dpmpp_2m-v", "dpmpp_2m", "normal", "DPMSolverMultistepScheduler", {}, 6, "v_prediction", {}),
    ("dpmpp_2m-leading", "dpmpp_2m", "leading", "DPMSolverMultistepScheduler", {"timestep_spacing": "leading"}, 6,
     "epsilon", {}),
    ("dpmpp_2m_karras", "DPM++ 2M Karras", None, "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, 8,
     "epsilon", {}),
    ("dpmpp_2m-exponential", "dpmpp_2m", "exponential", "DPMSolverMultistepScheduler",
     {"use_exponential_sigmas": True}, 6, "epsilon", {}),
    ("dpmpp_2m_sde", "DPM++ 2M SDE", None, "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 8,
     "epsilon", {}),
    ("dpmpp_2m_sde_karras-v", "DPM++ 2M SDE Karras", None, "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, 6, "v_prediction", {}),
    ("unipc", "UniPC", None, "UniPCMultistepScheduler", {}, 8, "epsilon", {}),
    ("unipc-trailing-v", "uni_pc", "simple", "UniPCMultistepScheduler", {"timestep_spacing": "trailing"}, 5,
     "v_prediction", {}),
    ("lcm", "LCM", None, "LCMScheduler", {}, 4, "epsilon", {}),
    ("lcm-v", "lcm", None, "LCMScheduler", {}, 6, "v_prediction", {}),
]


@pytest.mark.parametrize("name, scheduler, cls, settings, steps, prediction, extra", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_trajectory_matches_diffusers(tiny, name, scheduler, cls, settings, steps, prediction, extra):
    import diffusers
    cfg = SD15 | {"prediction_type": prediction} | extra.get("config", {})
    spec = resolve_sampler(name, scheduler)
    if "eta" in extra:
        spec = dataclasses.replace(spec, options={"eta": extra["eta"]})

    def generator():
        if extra.get("per_item_generators"):
            return [torch.Generator().manual_seed(10 + b) for b in range(B)]
        return torch.Generator().manual_seed(10)

    net = Net(tiny.unet)
    with torch.no_grad():
        ref = diffusers_run(getattr(diffusers, cls).from_config(cfg, **settings), net, tiny, steps,
                            generator=generator(), eta=extra.get("eta"))
        ours, out = fastldm_run(spec, cfg, net, tiny, steps, generator=generator())
    assert_same_trajectory(ours, ref, out)


@pytest.mark.parametrize("name, cls", [("Euler", "EulerDiscreteScheduler"), ("DDIM", "DDIMScheduler"),
                                       ("DPM++ 2M", "DPMSolverMultistepScheduler"), ("Heun", "HeunDiscreteScheduler"),
                                       ("UniPC", "UniPCMultistepScheduler")])
def test_img2img_matches_diffusers(tiny, name, cls):
    import diffusers
    net = Net(tiny.unet)
    with torch.no_grad():
        ref = diffusers_run(getattr(diffusers, cls).from_config(SD15), net, tiny, 10, init=tiny.init, strength=0.6)
        ours, out = fastldm_run(resolve_sampler(name), SD15, net, tiny, 10, init=tiny.init, strength=0.6)
    assert len(ours) == 6                                      # int(10 * 0.6) steps run
    assert_same_trajectory(ours, ref, out)


def test_unipc_bh1_matches_diffusers_before_its_last_step(tiny):
    """diffusers' bh1 multiplies B(h) = h = -inf by 0 on the step to σ=0 and returns NaN; all earlier steps agree,
    and fastldm's last step is the h -> ∞ limit (the x0 prediction)."""
    import diffusers
    net = Net(tiny.unet)
    with torch.no_grad():
        ref = diffusers_run(diffusers.UniPCMultistepScheduler.from_config(SD15, solver_type="bh1"), net, tiny, 6)
        ours, out = fastldm_run(resolve_sampler("uni_pc_bh1"), SD15, net, tiny, 6)
    assert_same_trajectory(ours[:-1], ref[:-1])
    assert torch.isfinite(out).all()


def test_guidance_one_runs_only_the_cond_batch(tiny):
    import diffusers
    net = Net(tiny.unet)
    with torch.no_grad():
        ref = diffusers_run(diffusers.EulerDiscreteScheduler.from_config(SD15), net, tiny, 5, guidance=1.0)
        net.batches.clear()
        ours, out = fastldm_run(resolve_sampler("Euler"), SD15, net, tiny, 5, guidance=1.0)
    assert net.batches == [B] * 5
    assert_same_trajectory(ours, ref, out)
    schedule = NoiseSchedule.from_config(SD15)
    for uncond, guidance, batch in [({"encoder_hidden_states": tiny.uncond}, GUIDANCE, 2 * B), (None, GUIDANCE, B)]:
        net.batches.clear()
        den = Denoiser(net, schedule, {"encoder_hidden_states": tiny.cond}, uncond, guidance)
        with torch.no_grad():
            sample(den, tiny.noise, resolve_sampler("DPM++ 2M"), schedule, 4)
        assert net.batches == [batch] * 4                      # one batched UNet call per step


def test_guidance_embedding_unet_matches_diffusers(tiny):
    """LCM-distilled UNets: guidance enters as `timestep_cond` = embedding(w - 1), no CFG batch (as diffusers'
    StableDiffusionPipeline does for a UNet with time_cond_proj_dim)."""
    import diffusers
    from diffusers import LatentConsistencyModelPipeline
    w = torch.tensor([0.5, 6.5])
    reference_embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding
    assert torch.equal(guidance_embedding(w, 9), reference_embedding(None, w, 9))
    net = Net(tiny_unet(time_cond_proj_dim=8))
    emb = guidance_embedding(torch.full((B,), GUIDANCE - 1), 8)
    with torch.no_grad():
        ref = diffusers_run(diffusers.LCMScheduler.from_config(SD15), net, tiny, 4,
                            generator=torch.Generator().manual_seed(5), timestep_cond=emb)
        net.batches.clear()
        ours, out = fastldm_run(resolve_sampler("LCM"), SD15, net, tiny, 4, generator=torch.Generator().manual_seed(5),
                                guidance_embedding_dim=8)
    assert net.batches == [B] * 4
    assert_same_trajectory(ours, ref, out)


def test_callback_can_stop_early_and_returns_x0(tiny):
    net, seen = Net(tiny.unet), []
    schedule = NoiseSchedule.from_config(SD15)
    den = Denoiser(net, schedule, {"encoder_hidden_states": tiny.cond}, {"encoder_hidden_states": tiny.uncond}, 7.5)

    def stop_at_2(info):
        seen.append(info)
        return info["i"] == 2

    with torch.no_grad():
        out = sample(den, tiny.noise, resolve_sampler("DDIM"), schedule, 10, callback=stop_at_2)
    assert [s["i"] for s in seen] == [0, 1, 2] and len(net.batches) == 3
    assert {"i", "total", "sigma", "sigma_next", "x", "denoised"} <= set(seen[-1]) and seen[-1]["total"] == 10
    assert torch.equal(out, seen[-1]["denoised"])              # x0 prediction, already VP (σ = 0)


def test_randn_draws_like_diffusers():
    from diffusers.utils.torch_utils import randn_tensor
    shape = (3, 4, 5, 5)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    assert torch.equal(randn(shape, gens()), randn_tensor(shape, generator=gens()))
    one = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    assert torch.equal(randn(shape, one()), randn_tensor(shape, generator=one()))
    assert torch.equal(randn(shape, [one()]), randn_tensor(shape, generator=one()))
    with pytest.raises(ValueError, match="generators"):
        randn(shape, gens()[:2])


# --------------------------------------------------------------------------------------------- registry

@pytest.mark.parametrize("name, canonical, sigmas", [
    ("Euler a", "euler_ancestral", "default"), ("euler_ancestral", "euler_ancestral", "default"),
    ("k_euler_a", "euler_ancestral", "default"), ("DPM++ 2M Karras", "dpmpp_2m_karras", "karras"),
    ("DPM++ 2M", "dpmpp_2m", "default"), ("dpmpp_2m", "dpmpp_2m", "default"),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", "default"), ("dpmpp_2m_sde", "dpmpp_2m_sde", "default"),
    ("DDIM", "ddim", "default"), ("UniPC", "uni_pc", "default"), ("uni_pc", "uni_pc", "default"),
    ("LCM", "lcm", "default"), ("Heun", "heun", "default"), ("Euler", "euler", "default"),
    ("EulerDiscreteScheduler", "euler", "default"), ("dpmsolvermultistepscheduler", "dpmpp_2m", "default"),
])
def test_known_names_resolve(name, canonical, sigmas):
    spec = resolve_sampler(name)
    assert (spec.name, spec.sigmas, spec.spacing) == (canonical, sigmas, None)


@pytest.mark.parametrize("scheduler, spacing, sigmas", [
    ("karras", None, "karras"), ("exponential", "linspace", "exponential"), ("normal", "linspace", "default"),
    ("simple", "trailing", "default"), ("sgm_uniform", "trailing", "default"), ("SGM Uniform", "trailing", "default"),
    ("automatic", None, "default"), ("leading", "leading", "default"),
])
def test_scheduler_names(scheduler, spacing, sigmas):
    spec = resolve_sampler("dpmpp_2m", scheduler)
    assert (spec.spacing, spec.sigmas) == (spacing, sigmas)
    assert scheduler.lower().replace(" ", "_") in list_schedulers()


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown sampler 'DPM fast'.*Euler a.*dpmpp_2m") as e:
        resolve_sampler("DPM fast")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown scheduler 'beta'.*karras"):
        resolve_sampler("Euler", "beta")


def test_list_samplers():
    specs = list_samplers()
    assert len({s.name for s in specs}) == len(specs) >= 9
    assert {s.label for s in specs} >= {"Euler a", "DPM++ 2M Karras", "DPM++ 2M SDE", "DDIM", "UniPC", "LCM", "Heun",
                                        "Euler", "DPM++ 2M"}
    assert {s.name for s in specs if s.stochastic} == {"euler_ancestral", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "lcm"}


def test_sample_argument_errors():
    schedule = NoiseSchedule.from_config(SD15)
    den = Denoiser(lambda x, t: x, schedule, {})
    noise = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="init_latents"):
        sample(den, noise, resolve_sampler("Euler"), schedule, 10, strength=0.5)
    with pytest.raises(ValueError, match="no denoising step"):
        sample(den, noise, resolve_sampler("Euler"), schedule, 10, init_latents=noise, strength=0.05)


# --------------------------------------------------------------------- analytic Gaussian data, x0 ~ N(MU, S²)

MU, S = 0.3, 0.6
SD_SCHEDULE = NoiseSchedule.from_config(SD15)


class Gaussian:
    """The exact denoiser E[x0 | x = x0 + σε] = (S²·x + σ²·MU)/(S² + σ²)."""
    def __call__(self, x, sigma):
        return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)

    def sigma_to_t(self, sigma):  # for LCM's boundary condition
        return SD_SCHEDULE.sigma_to_t(torch.as_tensor(sigma).reshape(-1))


def ode_solution(x_start, sigma_start, sigma_end):
    """PF-ODE flow for Gaussian data: x(σ) = MU + (x(σ_start) - MU)·sqrt(S²+σ²)/sqrt(S²+σ_start²)."""
    return MU + (x_start - MU) * ((S**2 + sigma_end**2) / (S**2 + sigma_start**2)) ** 0.5


@pytest.mark.parametrize("fn, opts, min_ratio", [
    (sample_euler, {}, 1.8), (sample_ddim, {}, 1.8),                  # first order: error halves per doubling
    (sample_heun, {}, 3.5), (sample_dpmpp_2m, {}, 3.5),                # second order: error / 4
    (sample_unipc, {}, 3.5), (sample_unipc, {"variant": "bh1"}, 3.5),  # (UniPC measured ~10: UniC adds an order)
], ids=["euler", "ddim", "heun", "dpmpp_2m", "unipc", "unipc_bh1"])
def test_deterministic_samplers_converge_to_the_ode_solution(fn, opts, min_ratio):
    """Karras sigmas 10 -> 0.05 (no final σ=0 step, whose x0 = posterior mean is not the ODE endpoint)."""
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    for n in (10, 20, 40):
        sigmas = karras_sigmas(n + 1, 0.05, 10.0)
        x = MU + (S**2 + 10.0**2) ** 0.5 * z
        errors[n] = (drive(fn(x, sigmas, **opts), Gaussian()) - ode_solution(x, 10.0, 0.05)).abs().max().item()
    assert errors[10] > errors[20] > errors[40]
    assert errors[20] / errors[40] >= min_ratio
    if min_ratio > 2:  # measured Euler error at 40 steps: 6.4e-2
        assert errors[40] < 1e-2


def _stats(fn, steps, **opts):
    sigmas = torch.cat([karras_sigmas(steps, 0.03, 14.6), torch.zeros(1, dtype=torch.float64)])
    z = torch.randn(10000, 4, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = drive(fn(MU + (S**2 + 14.6**2) ** 0.5 * z, sigmas, generator=torch.Generator().manual_seed(1), **opts),
                Gaussian())
    return out.mean().item(), out.std().item()


@pytest.mark.parametrize("fn, opts", [(sample_euler_ancestral, {}), (sample_ddim, {"eta": 1.0})],
                         ids=["euler_a", "ddim_eta1"])
def test_ancestral_samplers_reach_the_data_distribution(fn, opts):
    """40k samples: standard error of the mean 0.003, of the std 0.002. Ancestral Euler is first order in the std
    (measured |std - S| 0.045 at 50 steps, 0.009 at 200), so: the bias falls with steps and is < 0.03 at 200."""
    mean50, std50 = _stats(fn, 50, **opts)
    mean200, std200 = _stats(fn, 200, **opts)
    assert abs(mean50 - MU) < 0.02 and abs(mean200 - MU) < 0.02
    assert abs(std200 - S) < abs(std50 - S) and abs(std200 - S) < 0.03


def test_dpmpp_2m_sde_reaches_the_data_distribution():
    """Second order: measured |std - S| 0.002 at 50 steps; tolerance 0.015 (7 standard errors)."""
    mean, std = _stats(sample_dpmpp_2m_sde, 50)
    assert abs(mean - MU) < 0.02 and abs(std - S) < 0.015


def test_lcm_output_distribution_is_exact():
    """LCM is affine in x per step, so its output is Gaussian with a mean/variance we can propagate exactly:
    x ~ N(m, v) -> f = a·x + b (consistency boundary condition on D) -> x' = f + σ'·z."""
    grid = SD_SCHEDULE.grid(4, "lcm", "leading")
    sigmas = grid.sigmas.double()
    z = torch.randn(40000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = drive(sample_lcm(MU + (S**2 + sigmas[0] ** 2) ** 0.5 * z, sigmas, timesteps=Gaussian().sigma_to_t(sigmas),
                           generator=torch.Generator().manual_seed(1)), Gaussian())
    m, v = MU, S**2 + sigmas[0].item() ** 2
    for i in range(4):
        s, t = sigmas[i].item(), grid.timesteps[i].item() * 10
        c_skip, c_out = 0.25 / (t * t + 0.25), t / (t * t + 0.25) ** 0.5
        a = c_out * S**2 / (S**2 + s**2) + c_skip / (1 + s**2) ** 0.5
        m, v = a * m + c_out * s**2 * MU / (S**2 + s**2), a * a * v + sigmas[i + 1].item() ** 2
    # 5 standard errors: sqrt(v/N) for the mean, v·sqrt(2/N) for the variance.
    assert abs(out.mean().item() - m) < 5 * (v / 40000) ** 0.5
    assert abs(out.var().item() - v) < 5 * v * (2 / 40000) ** 0.5


def test_lcm_boundary_condition():
    """f(x, t) = c_skip(t)·x_vp + c_out(t)·x̂0 (Song et al. 2023): with x̂0 = 0 only the skip term remains.
    (At the usual timesteps c_skip < 1e-6, so the parity tests cannot see it; t = 19 makes it 7e-6 · x_vp.)"""
    class Zero(Gaussian):
        def __call__(self, x, sigma):
            return torch.zeros_like(x)
    sigma = SD_SCHEDULE.sigmas[19].double()
    sigmas = torch.stack([sigma, sigma * 0])
    out = drive(sample_lcm(torch.ones(1, 1, 1, 1, dtype=torch.float64), sigmas, timesteps=Zero().sigma_to_t(sigmas)),
                Zero())
    c_skip = 0.25 / (190.0**2 + 0.25)
    assert out.item() == pytest.approx(c_skip / (1 + sigma.item() ** 2) ** 0.5, rel=1e-4)  # t from σ: ±2e-4 of 19
