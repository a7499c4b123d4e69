"""The report's sections as units: every headline reaches report.json, report.md, the printed summary,
the ablation table and demo.json, and a section registered from outside does too."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxldm import ablate
from jaxldm.eval import evaluate, sections

pytestmark = pytest.mark.xdist_group(name="pipeline")  # Shares the mini_demo fixture with test_evaluate.py.

HEADINGS = {sections.COVERED: evaluate.RELEASED_HEADING, sections.HELDOUT: evaluate.HELDOUT_HEADING,
            sections.OWNER: evaluate.OWNER_HEADING}


class MeanIntensity(sections.Section):
  """A toy metric: the mean voxel value of the samples and of the held-out volumes."""
  key, name, part = "mean_intensity", "mean intensity", sections.HELDOUT
  HEADLINES = (sections.Headline("mean_intensity_gap", "mean intensity gap", spec=".4f"),
               sections.Headline("mean_intensity_samples", "mean intensity of the samples", flat=False))

  def run(self, ctx):
    return {"samples": float(np.mean(ctx.syn_v)), "real": float(np.mean(ctx.real_v))}

  def headlines(self, result):
    return {"mean_intensity_gap": result["samples"] - result["real"], "mean_intensity_samples": result["samples"]}

  def markdown(self, result):
    return "\n".join(["### Mean intensity", "", "| metric | value |", "|---|---|",
                      f"| mean intensity gap | {sections.fmt(result['samples'] - result['real'])} |",
                      f"| mean intensity of the samples / real | {sections.fmt(result['samples'])} / "
                      f"{sections.fmt(result['real'])} |"])


def _same(a, b) -> bool:
  """Equal as JSON (a NaN, e.g. of a failed measurement, equals itself there)."""
  return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _parts(md: str) -> dict[str, str]:
  """report.md split at its three headings: {release kind: the text under its heading}."""
  _, rest = md.split(evaluate.RELEASED_HEADING)
  covered, rest = rest.split(evaluate.HELDOUT_HEADING)
  heldout, owner = rest.split(evaluate.OWNER_HEADING)
  return {sections.COVERED: covered, sections.HELDOUT: heldout, sections.OWNER: owner}


def _shown(value) -> list[str]:
  """How report.md shows a headline value: each number of it as `fmt` writes it (none when it does not apply)."""
  values = value.values() if isinstance(value, dict) else [value]
  return [sections.fmt(v) for v in values if v is not None]


def _check_headlines(report: dict, md: str, registry: list[sections.Section]) -> None:
  """Each section's block sits under its heading and shows every headline (label and value); flat
  headlines are top-level keys of report.json; the printed summary labels every one of them."""
  parts, printed = _parts(md), evaluate.summary(report, registry)
  owner_line = printed.split("for the data owner only")[1]
  for section in registry:
    result = report[section.key]
    block, values = section.markdown(result), section.headlines(result)
    assert block and block in parts[section.placement(result)], section.key
    assert set(values) == {h.name for h in section.HEADLINES}, section.key
    for h in section.HEADLINES:
      if h.flat:
        assert _same(report[h.name], values[h.name]), h.name
      if _shown(values[h.name]):
        assert h.label in block, (section.key, h.label)
      for text in _shown(values[h.name]):
        assert text in block, (h.name, text)
      # Data owner's numbers are printed after the data owner's warning, the others before it.
      owner = (h.name if h.flat else section.key) in report[sections.OWNER]
      assert (h.text(values[h.name]) in owner_line) == owner, h.name
      assert h.text(values[h.name]) in printed, h.name


def _check_ablation(report: dict, tmp_path, registry: list[sections.Section]) -> str:
  """The report as one run of a study: every headline is a CSV column and a column of summary.md."""
  run = ablate.Run(target_epsilon=10.0, pretrained=True, noise_multiplicity=1, l2_clip_norm=1.0, seed=0)
  path = ablate.report_path(tmp_path, run)
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps(report))
  row = ablate.row(tmp_path, run)
  ablate.write_csv([row], tmp_path / "ablation.csv")
  header, values = (tmp_path / "ablation.csv").read_text().splitlines()
  csv_row = dict(zip(header.split(","), values.split(",")))
  table = ablate.summary_markdown(ablate.summarize([row]))
  head, _, cells = table.splitlines()[:3]
  labels, cells = [c.strip() for c in head.split("|")[1:-1]], [c.strip() for c in cells.split("|")[1:-1]]
  shown = dict(zip(labels, cells))
  for section in registry:
    values = section.headlines(report[section.key])
    for h in section.HEADLINES:
      expected = h.scalar(values[h.name])
      assert row[h.column_name] == expected, h.name
      assert csv_row[h.column_name] == ("" if expected is None else f"{expected:.6g}"), h.name
      # One seed: the mean alone, no interval.
      want = "n/a" if expected is None else ("inf" if np.isinf(expected) else f"{expected:{h.spec}}")
      assert shown[h.column_label] == want, (h.column_label, shown)
  return table


def test_every_headline_reaches_the_report_the_summary_and_the_study_table(mini_demo, tmp_path):
  """The demo's DP report: every registered section's headlines in report.json, report.md, the printed
  summary, ablation.csv / summary.md and demo.json."""
  out = mini_demo[0]
  report = json.loads((out / "report.json").read_text())
  md = (out / "report.md").read_text()
  registry = sections.registered()
  _check_headlines(report, md, registry)
  _check_ablation(report, tmp_path, registry)
  demo = json.loads((out / "demo.json").read_text())["dp"]
  assert _same(demo, sections.digest(report))
  for h in sections.headline_specs():
    if h.name != "controllability":  # Its digest keeps r with MAE and failed measurements per attribute.
      assert h.name in demo, h.name
  assert {k: v["pearson_r"] for k, v in demo["controllability"].items()} == report["controllability"]


def test_a_registered_section_reaches_every_output(mini_demo, tmp_path, monkeypatch):
  """A new metric is one Section appended to the registry: evaluate, report.md, the release lists, the
  printed summary, the study table and demo.json pick it up."""
  out = mini_demo[0]
  toy = MeanIntensity()
  monkeypatch.setattr(sections, "SECTIONS", [*sections.SECTIONS, toy])
  # The DP run again, on its own samples (and their latents) from the demo: no sampling.
  report = evaluate.evaluate(out / "ldm_dp", out / "phantoms/heldout", tmp_path / "eval", evaluate.Options(
      samples=str(out / "samples"), feature_weights=str(out / "ssl"), batch_size=4, training_images=False))
  on_disk = json.loads((tmp_path / "eval" / "report.json").read_text())
  assert on_disk["mean_intensity"] == report["mean_intensity"]
  gap = on_disk["mean_intensity"]["samples"] - on_disk["mean_intensity"]["real"]
  assert on_disk["mean_intensity_gap"] == pytest.approx(gap) and "mean_intensity_samples" not in on_disk
  assert {"mean_intensity", "mean_intensity_gap"} <= set(on_disk[sections.HELDOUT])
  # The built-in sections are still all there, with the same keys as the demo's own report.
  demo_report = json.loads((out / "report.json").read_text())
  assert set(on_disk) ^ set(demo_report) == {"mean_intensity", "mean_intensity_gap"}
  md = (tmp_path / "eval" / "report.md").read_text()
  assert "### Mean intensity" in _parts(md)[sections.HELDOUT]
  _check_headlines(on_disk, md, sections.registered())
  assert "mean intensity gap" in evaluate.summary(on_disk).split("for the data owner only")[0]
  table = _check_ablation(on_disk, tmp_path / "study", sections.registered())
  assert "mean intensity gap" in table and "mean_intensity_gap" in ablate.columns()
  assert sections.digest(on_disk)["mean_intensity_samples"] == on_disk["mean_intensity"]["samples"]
  # Registered after the others, and only the quality section compares samples with the held-out set
  # in the extractor's space: the toy's block comes after the quality table.
  heldout = _parts(md)[sections.HELDOUT]
  assert heldout.index("FID (") < heldout.index("### Mean intensity")


def test_sections_run_alone_and_never_overwrite_a_report_key(mini_demo, tmp_path):
  """A chosen list of sections runs without the others; a section whose key is taken is an error."""
  out = mini_demo[0]
  opts = evaluate.Options(samples=str(out / "samples"), feature_weights=str(out / "ssl"), batch_size=4,
                          training_images=False)
  report = evaluate.evaluate(out / "ldm_dp", out / "phantoms/heldout", tmp_path / "alone", opts,
                             sections=[sections.Privacy(), MeanIntensity()])
  assert {"privacy", "mean_intensity", "epsilon", "mean_intensity_gap"} <= set(report)
  assert not {"quality", "memorization", "fid", "copy_rate"} & set(report)
  md = (tmp_path / "alone" / "report.md").read_text()
  assert "### Mean intensity" in md and "epsilon" in md and "FID (" not in md

  class Clash(MeanIntensity):
    key = "samples"  # The run metadata's key.

  with pytest.raises(ValueError, match="'samples' is taken"):
    evaluate.evaluate(out / "ldm_dp", out / "phantoms/heldout", tmp_path / "clash", opts, sections=[Clash()])


def test_headline_values_for_tables_and_the_printed_summary():
  rero = sections.Privacy.HEADLINES[2]
  assert rero.scalar({"0.1": 0.5, "0.001": 0.07, "0.01": 0.2}) == 0.07 and rero.scalar(None) is None
  assert rero.text({"0.001": 0.07}) == "ReRo bound prior 0.001: 0.07"
  ctl = sections.Controllability.HEADLINES[0]
  assert ctl.column_name == "controllability_r" and ctl.column_label == "controllability r (mean over attributes)"
  assert ctl.scalar({"lv": 0.5, "rv": float("nan"), "myo": None, "x": 0.7}) == pytest.approx(0.6)
  assert ctl.scalar({}) is None and ctl.text({}) == "controllability r -"
  assert sections.Quality.HEADLINES[0].text(float("inf")) == "FID inf"
