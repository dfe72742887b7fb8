"""The documentation site: every Python sample runs, the generated sections are right, the nav is whole.

How the samples run (the same rules are stated on the site's first page):

- every fenced ``python`` block of ``docs/*.md`` runs; a page's blocks run in order in one
  namespace, as a reader would paste them into one session;
- ``index.md`` (the quickstart) runs first, in a fresh folder; every other page runs in a fresh
  copy of the folder it left behind (``data.json``, ``lora-alpaca/``, ``merged/``), because the
  pages say "the adapter from the quickstart";
- ``default_base_model()`` (SmolLM2-135M, ~30 s per training step on a small CPU) is replaced by a
  tiny random Llama with the same tokenizer (the ``tiny_model_dir`` fixture), so the samples run in
  seconds; that text substitution is the only change made to a sample;
- blocks in other languages (``bash``, ``text``, ``yaml``, ``json``) are not run, nor a ``python``
  block right after a ``<!-- no-test: REASON -->`` line; both are counted, and the number of
  skipped Python blocks is capped so the skip marker stays the exception.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<marker><!-- no-test: (?P<reason>[^>]+?) -->\n)?```(?P<lang>\w*)[^\n]*\n(?P<code>.*?)^```$",
                   re.MULTILINE | re.DOTALL)
BASE_CALL = "default_base_model()"
MAX_SKIPPED_PYTHON = 4


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip_reason: str | None


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` with its language, first line and skip marker."""
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("code")) + 1
        found.append(Block(page.name, line, m.group("lang"), m.group("code"), m.group("reason")))
    return found


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)


def run_page(page: Path, workdir: Path, base: Path) -> int:
    """Run the Python blocks of ``page`` in ``workdir`` and return how many ran."""
    namespace: dict = {"__name__": f"docs_{page.stem}", "_DOCS_BASE_MODEL": base}
    ran = 0
    old = Path.cwd()
    os.chdir(workdir)
    try:
        for block in blocks(page):
            if block.lang != "python" or block.skip_reason:
                continue
            code = block.code.replace(BASE_CALL, "_DOCS_BASE_MODEL")
            # Pad with newlines so a traceback names the line of the Markdown file.
            exec(compile("\n" * (block.line - 1) + code, str(page), "exec"), namespace)  # noqa: S102
            ran += 1
    finally:
        os.chdir(old)
    return ran


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The folder a reader has after the quickstart page: data, adapter and merged model."""
    folder = tmp_path_factory.mktemp("docs-quickstart")
    assert run_page(DOCS / "index.md", folder, tiny_model_dir) >= 3
    return folder


@pytest.mark.slow
def test_quickstart_goes_from_nothing_to_a_merged_model(quickstart_dir: Path):
    adapter, merged = quickstart_dir / "lora-alpaca", quickstart_dir / "merged"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert (merged / "model.safetensors").is_file() and (merged / "merge_report.json").is_file()
    assert not [p for p in merged.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


GUIDES = [p for p in doc_pages() if p.name != "index.md"
          and any(b.lang == "python" and not b.skip_reason for b in blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", GUIDES, ids=[p.stem for p in GUIDES])
def test_page_samples_run(page: Path, quickstart_dir: Path, tiny_model_dir: Path, tmp_path: Path):
    workdir = tmp_path / "work"
    shutil.copytree(quickstart_dir, workdir)
    assert run_page(page, workdir, tiny_model_dir) >= 1


def test_sample_counts_and_skip_markers():
    all_blocks = [b for p in doc_pages() for b in blocks(p)]
    python = [b for b in all_blocks if b.lang == "python"]
    skipped = [b for b in python if b.skip_reason]
    run = len(python) - len(skipped)
    other = [b for b in all_blocks if b.lang != "python"]
    print(f"\ndocs samples: {run} python blocks run, {len(skipped)} python blocks skipped "
          f"({[f'{b.page}:{b.line} {b.skip_reason}' for b in skipped]}), {len(other)} non-python blocks")
    assert run >= 30
    assert len(skipped) <= MAX_SKIPPED_PYTHON
    assert all(b.lang for b in all_blocks), [f"{b.page}:{b.line}" for b in all_blocks if not b.lang]
    # A skip marker before anything but a Python block would silently mean nothing.
    assert all(b.lang == "python" for b in all_blocks if b.skip_reason)


# ---- the build's generated sections and nav ---------------------------------------------------


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks_generated", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_shows_every_subcommand_and_flag():
    import dataclasses

    from alpaca_lora.cli.main import build_parser
    from alpaca_lora.config import FinetuneConfig

    hooks = _hooks()
    text = hooks.cli_reference()
    names = list(hooks.subcommands(build_parser()))
    assert {"demo", "finetune"} <= set(names)
    for name in names:
        assert f"## alpaca-lora {name}\n" in text
    finetune_help = text.split("## alpaca-lora finetune\n", 1)[1].split("\n## ", 1)[0]
    for f in dataclasses.fields(FinetuneConfig):
        assert f"--{f.name} " in finetune_help, f.name
    assert "30% more compute" in " ".join(finetune_help.split())  # a literal % in a field doc survives argparse


def test_memory_table_is_estimate_memory_and_fits_24gb():
    from alpaca_lora import estimate_memory

    hooks = _hooks()
    text = hooks.memory_24gb()
    for model, (mb, cutoff) in hooks.RECOMMENDED.items():
        total = estimate_memory(hooks.LLAMA_SHAPES[model], micro_batch_size=mb, cutoff_len=cutoff).total
        assert f"**{total / 2**30:.1f}**" in text
        # qlora-24gb.md recommends these settings for a 24 GB card.
        assert total < 22 * 2**30, (model, total)
    with pytest.raises(KeyError, match="unknown generated section"):
        hooks.render("<!-- generated: nope -->")


def test_nav_lists_every_page_and_nothing_else():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))

    def leaves(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [x for item in node for x in leaves(item)]
        return [x for value in node.values() for x in leaves(value)]

    nav = leaves(config["nav"])
    pages = [p.relative_to(DOCS).as_posix() for p in doc_pages()]
    assert sorted(nav) == sorted(pages)
    assert len(nav) == len(set(nav))
