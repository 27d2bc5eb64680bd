"""ldm-eval frontier: the Pareto front and the bar as pure functions, the configuration and bar syntax (good and
bad), and whole runs on the tiny random checkpoint: the report's fields, the reference distance against latents
sampled here, refused configurations reported as skipped, and bad flags as one line before any work."""

import json
from pathlib import Path

import numpy as np
import pytest

from ldm_runtime.engines import load_engine
from ldm_runtime.pipeline import Pipeline
from ldm_tools import evaluate
from ldm_tools.frontier import (
    CONFIG_SYNTAX, EVERY_NOISE_LEVEL, FrontierError, SamplingConfig, fid_ratio_above_floor, format_report, main,
    meets_bar, parse_bar, parse_config, pareto_front, summarize,
)
from tests.ldm_export.tiny_checkpoint import shared_tiny_checkpoint


def brute_force_front(speeds, qualities):
    """The definition, checked point by point against every other point."""
    front = []
    for i, (speed, quality) in enumerate(zip(speeds, qualities)):
        mine = (speed, *quality)
        if not any(all(a >= b for a, b in zip(other, mine)) and any(a > b for a, b in zip(other, mine))
                   for other in ((s, *q) for s, q in zip(speeds, qualities))):
            front.append(i)
    return front


@pytest.mark.parametrize("dimensions", [1, 2])
def test_pareto_front_keeps_exactly_the_points_no_other_beats_fastest_first(rng, dimensions):
    for _ in range(20):
        count = int(rng.integers(1, 30))
        # a coarse grid, so that ties in speed or quality and equal points happen
        speeds = rng.integers(0, 6, size=count).astype(float)
        qualities = rng.integers(0, 6, size=(count, dimensions)).astype(float)
        front = pareto_front(list(speeds), qualities.tolist())
        assert sorted(front) == brute_force_front(speeds, qualities.tolist())
        assert [speeds[i] for i in front] == sorted((speeds[i] for i in front), reverse=True)


def test_pareto_front_of_a_hand_made_set():
    # (images/s, -latent RMS): C is slower and worse than B; D and E are equal and both kept
    speeds = [1.0, 2.0, 1.5, 3.0, 3.0]
    qualities = [[-0.1], [-0.2], [-0.3], [-0.5], [-0.5]]
    assert pareto_front(speeds, qualities) == [3, 4, 1, 0]


@pytest.mark.parametrize("text, expected", [
    ("torch/fp32/euler:6", SamplingConfig("torch", "fp32", "euler", 6)),
    ("onnxruntime/fp32/ddim:10/cache=2/gi=0.5-8",
     SamplingConfig("onnxruntime", "fp32", "ddim", 10, 2, "uniform", (0.5, 8.0))),
    ("openvino/bf16/dpmpp-2m:12/gi=0-10/cache=3:quadratic",
     SamplingConfig("openvino", "bf16", "dpmpp-2m", 12, 3, "quadratic", (0.0, 10.0))),
    ("torch/bf16/ddim:25/cache=1:quadratic", SamplingConfig("torch", "bf16", "ddim", 25)),
    ("onnxruntime/fp32/lcm:4/model=lcm", SamplingConfig("onnxruntime", "fp32", "lcm", 4, model="lcm")),
    ("onnxruntime/fp32/tcd:4/eta=0.3/model=lcm", SamplingConfig("onnxruntime", "fp32", "tcd", 4, model="lcm", eta=0.3)),
    ("torch/fp32/ddim:10/eta=1", SamplingConfig("torch", "fp32", "ddim", 10, eta=1.0)),
    ("torch/fp32/tcd:4/eta=0", SamplingConfig("torch", "fp32", "tcd", 4)),
    ("onnxruntime/fp32/euler:8/g=3", SamplingConfig("onnxruntime", "fp32", "euler", 8, guidance_scale=3.0)),
    ("torch/fp32/ddim:8/g=1/model=cfg", SamplingConfig("torch", "fp32", "ddim", 8, model="cfg", guidance_scale=1.0)),
])
def test_good_configurations_parse_and_their_names_read_back_the_same(text, expected):
    config = parse_config(text)
    assert config == expected
    assert parse_config(config.name) == config
    request = config.request("a red circle", 7, 5.0)
    assert (request.sampler, request.steps, request.cache_interval, request.cache_schedule, request.eta) == (
        expected.sampler, expected.steps, expected.cache_interval, expected.cache_schedule, expected.eta)
    assert request.guidance_interval == (expected.guidance_interval or EVERY_NOISE_LEVEL)
    assert request.guidance_scale == (5.0 if expected.guidance_scale is None else expected.guidance_scale)
    assert config.sampler_alone == (expected.cache_interval == 1 and expected.guidance_interval is None
                                    and expected.guidance_scale != 1.0)  # scale 1 saves the unconditional rows


@pytest.mark.parametrize("text, why", [
    ("euler:6", "has fewer than three parts"),
    ("torchy/fp32/euler:6", "names engine 'torchy'"),
    ("openvino/fp16/euler:6", "names precision 'fp16', which the openvino engine does not have"),
    ("torch/fp32/heun:6", "names sampler 'heun'"),
    ("torch/fp32/euler", "has steps '', not a positive integer"),
    ("torch/fp32/euler:0", "has steps '0'"),
    ("torch/fp32/euler:6/cache=0", "has cache interval '0'"),
    ("torch/fp32/euler:6/cache=2:cubic", "has cache schedule 'cubic'"),
    ("torch/fp32/euler:6/cache=2:", "has cache schedule '', not one of uniform, quadratic"),
    ("torch/fp32/euler:6/gi=8-0.5", "has guidance interval '8-0.5'"),
    ("torch/fp32/euler:6/gi=nan-1", "has guidance interval 'nan-1'"),
    ("torch/fp32/euler:6/seed=1", "has option 'seed=1'"),
    ("torch/fp32/euler:6/eta=1", "gives eta to the euler sampler, which takes none (only ddim and tcd do)"),
    ("torch/fp32/tcd:4/eta=1.5", "has eta '1.5', not a number from 0 to 1"),
    ("torch/fp32/ddim:4/eta=nan", "has eta 'nan', not a number from 0 to 1"),
    ("torch/fp32/euler:6/gi=0-1/gi=0-2", "gives gi= twice"),
    ("torch/fp32/euler:6/model=", "has an empty model name"),
    ("torch/fp32/euler:6/g=-1", "has guidance scale '-1', not a number from 0 to 100"),
    ("torch/fp32/euler:6/g=inf", "has guidance scale 'inf'"),
    ("torch/fp32/euler:6/g=100.5", "has guidance scale '100.5', not a number from 0 to 100"),
    ("torch/fp32/euler:6/g=1e308", "has guidance scale '1e308', not a number from 0 to 100"),
    ("torch/fp32/euler:6/g=3/g=4", "gives g= twice"),
])
def test_bad_configurations_are_one_sentence_naming_them(text, why):
    with pytest.raises(FrontierError) as error:
        parse_config(text)
    message = str(error.value)
    assert message.startswith(f"configuration {text!r} {why}") and message.endswith(f"; expected {CONFIG_SYNTAX}")
    assert "\n" not in message


def test_bar_terms_parse_and_bad_ones_are_refused():
    assert parse_bar("adherence-drop=0.02,fid-ratio=1.05") == {"adherence-drop": 0.02, "fid-ratio": 1.05}
    assert parse_bar("latent-rms=0.1, psnr-db=30") == {"latent-rms": 0.1, "psnr-db": 30.0}
    assert parse_bar("latent-rms-ratio=1.5") == {"latent-rms-ratio": 1.5}
    for text in ("fid=1.05", "latent-rms", "latent-rms=x", "psnr-db=inf", "latent-rms=1,latent-rms=2",
                 "adherence-drop=-0.1", "fid-ratio=0", "latent-rms-ratio=0"):
        with pytest.raises(FrontierError, match="^--bar term "):
            parse_bar(text)


@pytest.mark.parametrize("text, term", [("fid-ratio=1,fid-ratio=2", "fid-ratio=2"),
                                        ("latent-rms=1, psnr-db=30, latent-rms=1", "latent-rms=1")])
def test_a_bar_term_given_twice_is_named_as_given_twice(text, term):
    with pytest.raises(FrontierError) as error:
        parse_bar(text)
    key = term.partition("=")[0]
    assert str(error.value) == f"--bar term {term!r} gives {key} a second time; expected each term once"


def measured(name: str, images_per_s: float, shape: float = 0.9, fid: float = 240.0, rms: float = 0.1) -> dict:
    config = parse_config(name)
    return {**config.to_dict(), "engine_key": config.engine_key, "sampler_alone": config.sampler_alone,
            "status": "ok", "images_per_s": images_per_s, "adherence": {"shape": shape, "color": 0.99, "all": shape},
            "fid_in_domain": fid, "latent_rms": rms, "image_psnr_db": 30.0, "images_per_s_spread": 0.1,
            "whole_unet_rows_per_image": 2 * config.steps, "shallow_unet_rows_per_image": 0}


def test_meets_bar_applies_every_term_against_the_baseline():
    baseline = measured("torch/fp32/ddim:25", 1.0, shape=0.92, fid=240.0)
    bar = {"adherence-drop": 0.02, "fid-ratio": 1.05}
    assert meets_bar(measured("torch/fp32/euler:6", 3.0, shape=0.90, fid=252.0), baseline, bar)
    assert not meets_bar(measured("torch/fp32/euler:5", 3.0, shape=0.899, fid=240.0), baseline, bar)
    assert not meets_bar(measured("torch/fp32/euler:5", 3.0, shape=0.92, fid=252.1), baseline, bar)
    assert not meets_bar(measured("torch/fp32/euler:5", 3.0), {**baseline, "status": "skipped"}, bar)
    assert meets_bar(measured("torch/fp32/euler:5", 3.0, rms=0.2), None, {"latent-rms": 0.2})
    assert not meets_bar(measured("torch/fp32/euler:5", 3.0, rms=0.21), None, {"latent-rms": 0.2})
    assert meets_bar(measured("torch/fp32/euler:5", 3.0, rms=0.2), baseline, {"latent-rms-ratio": 2})
    assert not meets_bar(measured("torch/fp32/euler:5", 3.0, rms=0.21), baseline, {"latent-rms-ratio": 2})
    assert not meets_bar(measured("torch/fp32/euler:5", 3.0, rms=0.01), None, {"latent-rms-ratio": 2})
    nan_baseline = {**baseline, "adherence": {**baseline["adherence"], "color": float("nan")}}
    assert meets_bar(measured("torch/fp32/euler:6", 3.0, shape=0.90), nan_baseline, bar)


def test_summary_names_the_fastest_within_the_bar_per_engine_beside_ddim_and_the_sampler_alone():
    results = [measured("onnxruntime/fp32/ddim:25", 1.0, shape=0.92, rms=0.01),
               measured("onnxruntime/fp32/ddim:10", 2.0, shape=0.91, rms=0.05),
               measured("onnxruntime/fp32/euler:6", 3.0, shape=0.91, rms=0.08),
               measured("onnxruntime/fp32/euler:6/cache=2", 4.5, shape=0.905, rms=0.09),
               measured("onnxruntime/fp32/euler:4", 6.0, shape=0.5, rms=0.3),
               measured("torch/fp32/euler:6", 1.2, shape=0.91, rms=0.08),
               {**parse_config("openvino/bf16/euler:6").to_dict(), "engine_key": "openvino/bf16", "status": "skipped",
                "reason": "no bf16 here", "sampler_alone": True}]
    summary = summarize(results, "onnxruntime/fp32/ddim:25", {"adherence-drop": 0.02})
    assert summary["fastest_within_bar"] == "onnxruntime/fp32/euler:6/cache=2"
    assert summary["speedup_over_baseline"] == 4.5
    group = summary["by_engine"]["onnxruntime/fp32"]
    assert (group["fastest_ddim"], group["speedup_over_fastest_ddim"]) == ("onnxruntime/fp32/ddim:10", 2.25)
    assert (group["fastest_sampler_alone"], group["speedup_over_sampler_alone"]) == ("onnxruntime/fp32/euler:6", 1.5)
    assert summary["by_engine"]["torch/fp32"]["fastest"] == "torch/fp32/euler:6"
    assert "openvino/bf16" not in summary["by_engine"]
    # a --variant's DDIM is fastest and within the bar: the fastest DDIM and sampler alone stay --model's own
    variant = measured("onnxruntime/fp32/ddim:8/model=cfg", 5.0, shape=0.91, rms=0.06)
    group = summarize(results + [variant], "onnxruntime/fp32/ddim:25", {"adherence-drop": 0.02})["by_engine"][
        "onnxruntime/fp32"]
    assert group["fastest"] == "onnxruntime/fp32/ddim:8/model=cfg"
    assert (group["fastest_ddim"], group["speedup_over_fastest_ddim"]) == ("onnxruntime/fp32/ddim:10", 2.5)
    assert group["fastest_sampler_alone"] == "onnxruntime/fp32/euler:6"
    assert summary["frontier"]["latent_rms"] == ["onnxruntime/fp32/euler:4", "onnxruntime/fp32/euler:6/cache=2",
                                                 "onnxruntime/fp32/euler:6", "onnxruntime/fp32/ddim:10",
                                                 "onnxruntime/fp32/ddim:25"]
    assert [r["meets_bar"] for r in results[:6]] == [True, True, True, True, False, True]


def test_the_fid_bar_is_read_against_the_small_sample_floor_and_the_report_says_when_it_is_loose():
    # the demo model's figures at 200 prompts: floor 223.3, DDIM 25 at 244.3
    assert fid_ratio_above_floor(1.05, 244.3, 223.3) == pytest.approx((1.05 * 244.3 - 223.3) / 21.0)
    assert fid_ratio_above_floor(1.05, 200.0, 223.3) is None
    results = [measured("onnxruntime/fp32/ddim:25", 1.0, fid=244.3), measured("onnxruntime/fp32/euler:6", 3.0,
                                                                                fid=256.0)]
    bar = {"adherence-drop": 0.02, "fid-ratio": 1.05}
    summary = summarize(results, "onnxruntime/fp32/ddim:25", bar, fid_floor=223.3)
    assert summary["fid_ratio_above_floor"] == pytest.approx(1.5817, abs=1e-4)
    report = {"results": results, "summary": summary, "settings": {"num_prompts": 200}}
    line, = [line for line in format_report(report).splitlines() if "floor" in line]
    assert "223.3" in line and "91%" in line and "allows 58%" in line and "2127 prompts" in line, line
    # the floor at 1000 prompts is under twice the part above it: no line
    results[0]["fid_in_domain"] = 90.4
    summary = summarize(results, "onnxruntime/fp32/ddim:25", bar, fid_floor=47.4)
    assert summary["fid_ratio_above_floor"] == pytest.approx(1.1051, abs=1e-4)
    assert "floor" not in format_report({"results": results, "summary": summary, "settings": {"num_prompts": 1000}})
    # a baseline at or under the floor: the term compares noise
    results[0]["fid_in_domain"] = 40.0
    summary = summarize(results, "onnxruntime/fp32/ddim:25", bar, fid_floor=47.4)
    assert summary["fid_ratio_above_floor"] is None
    assert "compares sampling noise" in format_report({"results": results, "summary": summary,
                                                       "settings": {"num_prompts": 1000}})
    assert "fid_floor" not in summarize(results, "onnxruntime/fp32/ddim:25", {"adherence-drop": 0.02}, 47.4)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return shared_tiny_checkpoint(tmp_path_factory)


def final_latents(engine, config: SamplingConfig, seeds: list[int], captions: list[str]) -> np.ndarray:
    """Sampled here with the pipeline's own loop: (N, C, h, w) float64 latents as the UNet sees them."""
    pipeline = Pipeline(engine)
    states = pipeline.start([config.request(caption, seed, 5.0) for caption, seed in zip(captions, seeds)])
    while not all(state.done for state in states):
        states = pipeline.advance(states)
    return np.concatenate([engine.to_host(state.latents) for state in states]).astype(np.float64)


def test_a_run_on_the_tiny_checkpoint_reports_speed_and_the_reference_distance(tiny_checkpoint, tmp_path, capsys,
                                                                               seed, monkeypatch):
    import weakref

    import ldm_tools.frontier

    # the first image's new processes start once this one has let go of every engine it loaded
    loaded, alive_at_first_image = [], []
    load_engines, first_image_seconds = ldm_tools.frontier.load_engines, ldm_tools.frontier.first_image_seconds

    def recorded_load_engines(*args, **kwargs):
        engines = load_engines(*args, **kwargs)
        loaded.extend(weakref.ref(engine) for engine in engines.values() if not isinstance(engine, str))
        return engines

    def checked_first_image_seconds(*args, **kwargs):
        alive_at_first_image.append(sum(reference() is not None for reference in loaded))
        return first_image_seconds(*args, **kwargs)

    monkeypatch.setattr(ldm_tools.frontier, "load_engines", recorded_load_engines)
    monkeypatch.setattr(ldm_tools.frontier, "first_image_seconds", checked_first_image_seconds)
    report_path, plot_path = tmp_path / "frontier.json", tmp_path / "frontier.png"
    first_seed = seed % 1000
    configs = ["torch/fp32/ddim:3", "torch/fp32/euler:2/gi=0.5-20", "torch/fp32/ddim:6", "torch/fp32/ddim:5000",
               "torch/fp32/ddim:4/cache=2", "torch/fp32/ddim:3/g=1"]
    assert main(["--model", str(tiny_checkpoint), "--configs", *configs, "--reference-steps", "6", "--num-prompts", "3",
                 "--seed", str(first_seed), "--batch-size", "2", "--repeats", "2", "--speed-images", "2", "--bar",
                 "latent-rms=1e9", "--json", str(report_path), "--plot", str(plot_path), "--threads", "1"]) == 0
    report = json.loads(report_path.read_text())
    assert report["settings"]["judge"] == "none" and report["settings"]["reference"] == "torch/fp32/ddim:6"
    assert report["machine"]["cpu"] and report["settings"]["seeds"] == f"{first_seed}..{first_seed + 2}"
    results = {result["config"]: result for result in report["results"]}
    assert list(results) == configs
    refused = results["torch/fp32/ddim:5000"]
    assert refused["status"] == "skipped" and "steps is 5000" in refused["reason"]
    done = [result for result in results.values() if result["status"] == "ok"]
    assert len(done) == 5
    for result in done:
        assert result["images_per_s"] > 0 and len(result["images_per_s_rounds"]) == 2
        assert "adherence" not in result and set(result["on_frontier"]) <= {"latent_rms", "image_psnr_db"}
    # the configuration that is the reference lands on it exactly; the others are measured against it
    assert results["torch/fp32/ddim:6"]["latent_rms"] == 0 and results["torch/fp32/ddim:6"]["image_psnr_db"] == 100
    captions, _ = evaluate.heldout_prompts(3, 16, 0)
    seeds = [first_seed + index for index in range(3)]
    engine = load_engine(tiny_checkpoint, engine="torch")
    reference = final_latents(engine, parse_config("torch/fp32/ddim:6"), seeds, captions)
    for name in ("torch/fp32/ddim:3", "torch/fp32/euler:2/gi=0.5-20", "torch/fp32/ddim:3/g=1"):
        expected = np.sqrt(np.mean((final_latents(engine, parse_config(name), seeds, captions) - reference) ** 2))
        assert expected > 0 and results[name]["latent_rms"] == pytest.approx(expected, rel=1e-4)
    assert results["torch/fp32/ddim:3"]["whole_unet_rows_per_image"] == 6
    unguided = results["torch/fp32/ddim:3/g=1"]  # its own guidance scale, 1: no unconditional rows
    assert (unguided["guidance_scale"], unguided["whole_unet_rows_per_image"]) == (1.0, 3)
    assert results["torch/fp32/ddim:3"]["guidance_scale"] != 1.0
    assert results["torch/fp32/euler:2/gi=0.5-20"]["whole_unet_rows_per_image"] == 3  # one call guided, one not
    cached = results["torch/fp32/ddim:4/cache=2"]
    assert (cached["whole_unet_rows_per_image"], cached["shallow_unet_rows_per_image"]) == (4, 4)
    fastest = max(done, key=lambda result: result["images_per_s"])
    assert report["summary"]["fastest_within_bar"] == fastest["config"] and all(r["meets_bar"] for r in done)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the first image: one engine here, timed in new processes with its first configuration, cold then warm
    first = report["first_image"]["torch/fp32"]
    assert first["config"] == "torch/fp32/ddim:3" and first["cold_s"] > 0 and first["warm_s"] > 0
    assert len(loaded) == 1 and alive_at_first_image == [0]
    assert all(result["first_image"] == {"cold_s": first["cold_s"], "warm_s": first["warm_s"]} for result in done)
    output = capsys.readouterr().out
    assert "| torch/fp32/ddim:3 |" in output and "skipped torch/fp32/ddim:5000: " in output
    assert f"first image on torch/fp32 (a new process, one image of torch/fp32/ddim:3): cold {first['cold_s']:.1f} s" \
        in output


def test_a_first_image_that_cannot_be_made_is_reported_with_the_reason_and_leaves_no_cache_folder(
        tiny_checkpoint, tmp_path, monkeypatch):
    import tempfile

    import ldm_tools.frontier

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = parse_config("onnxruntime/fp32/ddim:2")
    folders = {None: ldm_tools.frontier.ModelFolders(None, {"fp32": Path(tiny_checkpoint)})}  # not an engine dir
    request = config.request("a red circle", 0, 5.0)
    first = ldm_tools.frontier.first_image_seconds(config, folders, "cpu", 1, request)
    assert set(first) == {"error"} and "the onnxruntime engine cannot run" in first["error"], first
    assert list(tmp_path.iterdir()) == []


def test_a_cache_interval_the_engine_cannot_serve_is_skipped_with_the_reason(tiny_checkpoint, tmp_path, monkeypatch):
    import ldm_tools.frontier

    def without_deep_cache(*args, **kwargs):
        engine = load_engine(*args, **kwargs)
        engine.deep_cache = False
        return engine

    monkeypatch.setattr(ldm_tools.frontier, "load_engine", without_deep_cache)
    report_path = tmp_path / "frontier.json"
    assert main(["--model", str(tiny_checkpoint), "--configs", "torch/fp32/ddim:2", "torch/fp32/ddim:4/cache=2",
                 "--reference-steps", "0", "--num-prompts", "2", "--repeats", "1", "--no-first-image", "--json",
                 str(report_path)]) == 0
    results = json.loads(report_path.read_text())["results"]
    assert results[0]["status"] == "ok" and "latent_rms" not in results[0]
    assert results[1]["status"] == "skipped" and "cache_interval is 2" in results[1]["reason"]


@pytest.mark.parametrize("flags, message", [
    (["--configs", "onnxruntime/fp32/ddim:4"], "configuration onnxruntime/fp32/ddim:4 runs on onnxruntime at fp32, "
                                               "which needs an engine dir exported at fp32 among --model"),
    (["--configs", "torch/fp32/ddim:4", "--bar", "fid-ratio=1.05"], "--bar fid-ratio has terms relative to a "
                                                                    "baseline; expected --baseline CONFIG too"),
    (["--configs", "torch/fp32/ddim:4", "--bar", "latent-rms=0.1", "--reference-steps", "0"],
     "--bar with latent-rms, latent-rms-ratio or psnr-db needs the reference run"),
    (["--configs", "torch/fp32/ddim:4", "--reference-sampler", "euler-a"],
     "--reference-sampler is 'euler-a'; expected a deterministic sampler"),
    (["--configs", "torch/fp32/ddim:4", "torch/fp32/ddim:4"], "--configs names torch/fp32/ddim:4 twice"),
    (["--configs", "torch/fp32/ddim:4/cach=2"], "configuration 'torch/fp32/ddim:4/cach=2' has option 'cach=2'"),
    (["--configs", "torch/fp32/ddim:4", "--repeats", "0"], "--repeats is 0; expected a positive integer"),
    (["--configs", "torch/fp32/ddim:4", "--judge", "shapes"], "--judge shapes judges 32 px images"),
    (["--configs", "torch/fp32/ddim:4/model=lcm"], "configuration torch/fp32/ddim:4/model=lcm names a model that no "
                                                   "--variant NAME=FOLDER gives (variants: none)"),
    (["--configs", "torch/fp32/ddim:4", "--variant", "lcm"], "--variant 'lcm' is not NAME=FOLDER"),
    (["--configs", "torch/fp32/ddim:4/model=v", "--variant", "v=/nowhere/v", "--variant", "w=/nowhere/w"],
     "--variant w=/nowhere/w names a model no configuration runs; expected a configuration with /model=w in "
     "--configs or --baseline"),
    (["--configs", "torch/fp32/ddim:4", "--guidance", "100.5"], "--guidance is 100.5; expected a number from 0 to "
                                                               "100"),
    (["--configs", "torch/fp32/ddim:4", "--guidance", "1e308"], "--guidance is 1e+308; expected a number from 0 to "
                                                               "100"),
    (["--configs", "torch/fp32/ddim:4", "--judge", "none", "--reference-steps", "0", "--plot", "never.png"],
     "--plot never.png has no quality metric to plot images/s against with --judge none and --reference-steps 0; "
     "expected --reference-steps above 0 or a judge"),
])
def test_bad_flags_are_one_line_and_exit_2_before_any_sampling(flags, message, tiny_checkpoint, tmp_path, capsys,
                                                             monkeypatch):
    import ldm_tools.frontier

    monkeypatch.setattr(ldm_tools.frontier, "sample", lambda *args, **kwargs: pytest.fail("something was sampled"))
    report_path = tmp_path / "frontier.json"
    assert main(["--model", str(tiny_checkpoint), "--json", str(report_path), *flags]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"ldm-eval frontier: error: {message}"), error
    assert error.count("\n") == 1 and not report_path.exists()


def test_a_variant_runs_on_its_own_folders_at_its_own_default_guidance_beside_the_model(tiny_checkpoint, tmp_path):
    """A distilled model (``--variant``) is judged against the same reference and grouped with the configurations
    of its engine; each samples at its model's default guidance: 1 for the variant, one UNet row an image."""
    import dataclasses

    from ldm_runtime.config import SamplerDefaults
    from ldm_runtime.engines import load_engine
    from ldm_train.checkpoint import write_random_checkpoint
    from tests.ldm_export.tiny_checkpoint import TINY_CONFIG

    variant = tmp_path / "variant"
    write_random_checkpoint(variant, dataclasses.replace(TINY_CONFIG, default_sampler=SamplerDefaults(
        name="lcm", steps=2, guidance_scale=1.0)), seed=1)
    report_path = tmp_path / "frontier.json"
    assert main(["--model", str(tiny_checkpoint), "--variant", f"v={variant}", "--configs", "torch/fp32/ddim:3",
                 "torch/fp32/lcm:2/model=v", "--reference-steps", "4", "--num-prompts", "2", "--repeats", "1",
                 "--no-first-image", "--bar", "latent-rms=1e9", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["settings"]["variants"] == {"v": [str(variant)]}
    ddim, lcm = report["results"]
    assert (ddim["guidance_scale"], ddim["whole_unet_rows_per_image"], ddim["model"]) == (5.0, 6, None)
    assert (lcm["guidance_scale"], lcm["whole_unet_rows_per_image"], lcm["model"]) == (1.0, 2, "v")
    assert lcm["engine_key"] == ddim["engine_key"] == "torch/fp32"
    captions, _ = evaluate.heldout_prompts(2, 16, 0)
    reference = final_latents(load_engine(tiny_checkpoint, engine="torch"), parse_config("torch/fp32/ddim:4"),
                              [0, 1], captions)
    pipeline = Pipeline(load_engine(variant, engine="torch"))
    states = pipeline.start([parse_config("torch/fp32/lcm:2").request(caption, seed, 1.0)
                             for caption, seed in zip(captions, [0, 1])])
    while not all(state.done for state in states):
        states = pipeline.advance(states)
    latents = np.concatenate([state.latents.numpy() for state in states]).astype(np.float64)
    assert lcm["latent_rms"] == pytest.approx(np.sqrt(np.mean((latents - reference) ** 2)), rel=1e-4)
    assert report["summary"]["by_engine"]["torch/fp32"]["fastest_ddim"] == "torch/fp32/ddim:3"


def test_ldm_eval_runs_the_frontier_as_its_subcommand(monkeypatch):
    import ldm_tools.frontier

    seen = []
    monkeypatch.setattr(ldm_tools.frontier, "main", lambda argv: seen.append(argv) or 0)
    from ldm_tools import eval_command

    assert eval_command.main(["frontier", "--model", "m"]) == 0 and seen == [["--model", "m"]]
    called = []
    monkeypatch.setattr(evaluate, "main", lambda argv: called.append(argv) or 0)
    assert eval_command.main(["--model", "m"]) == 0 and called == [["--model", "m"]]


def test_a_plot_with_no_quality_metric_under_judge_auto_is_refused_before_any_sampling(tiny_checkpoint, tmp_path,
                                                                                     capsys, monkeypatch):
    import ldm_tools.frontier

    # the shipped classifier draws 32 px, the tiny model 16 px: --judge auto judges nothing here
    monkeypatch.setattr(ldm_tools.frontier, "sample", lambda *args, **kwargs: pytest.fail("something was sampled"))
    report_path, plot_path = tmp_path / "frontier.json", tmp_path / "frontier.png"
    assert main(["--model", str(tiny_checkpoint), "--configs", "torch/fp32/ddim:2", "--reference-steps", "0",
                 "--json", str(report_path), "--plot", str(plot_path)]) == 2
    error = capsys.readouterr().err
    assert error == (f"ldm-eval frontier: error: --plot {plot_path} has no quality metric to plot images/s against: "
                     f"--judge auto has no classifier for 16 px images and --reference-steps is 0; expected "
                     f"--reference-steps above 0\n"), error
    assert not report_path.exists() and not plot_path.exists()


def test_a_run_whose_every_configuration_was_skipped_writes_the_report_and_exits_2_in_one_line(tiny_checkpoint,
                                                                                              tmp_path, capsys):
    report_path, plot_path = tmp_path / "frontier.json", tmp_path / "frontier.png"
    assert main(["--model", str(tiny_checkpoint), "--configs", "torch/fp32/ddim:5000", "--reference-steps", "2",
                 "--num-prompts", "2", "--repeats", "1", "--no-first-image", "--json", str(report_path),
                 "--plot", str(plot_path)]) == 2
    captured = capsys.readouterr()
    assert "skipped torch/fp32/ddim:5000: the torch engine refuses it: steps is 5000" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last == (f"ldm-eval frontier: error: every configuration was skipped (the reasons are listed above and in "
                    f"{report_path}); expected at least one that runs here"), captured.err
    assert "Traceback" not in captured.err and captured.err.count("error:") == 1
    assert [result["status"] for result in json.loads(report_path.read_text())["results"]] == ["skipped"]
    assert not plot_path.exists()


def test_plotting_a_report_with_nothing_measured_is_one_sentence_not_a_matplotlib_error(tmp_path):
    from ldm_tools.frontier import plot_frontier

    skipped = {**parse_config("torch/fp32/ddim:2").to_dict(), "status": "skipped", "reason": "refused"}
    for results in ([skipped], [measured("torch/fp32/ddim:2", 3.0)]):
        report = {"results": results, "summary": {"frontier": {}, "bar": {}, "baseline": None}}
        with pytest.raises(FrontierError, match=f"^--plot {tmp_path / 'p.png'} has nothing to plot: no configuration "
                                                f"was measured against a quality metric"):
            plot_frontier(report, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("subcommand", [False, True])
def test_ctrl_c_is_one_line_and_exit_130(tiny_checkpoint, tmp_path, capsys, monkeypatch, subcommand):
    import ldm_tools.frontier
    from ldm_tools import eval_command

    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(ldm_tools.frontier, "run_frontier", interrupted)
    argv = ["--model", str(tiny_checkpoint), "--configs", "torch/fp32/ddim:2", "--json", str(tmp_path / "f.json")]
    try:
        code = eval_command.main(["frontier", *argv]) if subcommand else main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left main as a KeyboardInterrupt (a traceback)")
    assert code == 130
    assert capsys.readouterr().err == "ldm-eval frontier: interrupted\n"
