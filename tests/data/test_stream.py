"""Streamed loading of JSONL and Parquet: the records, errors and skips of reading whole, a content-keyed cache,
the fingerprint computed while reading, and bounded memory for 200,000 records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alpaca_lora.data import sources, stream
from alpaca_lora.data.prepare import data_fingerprint
from alpaca_lora.data.sources import load_data, records_key, stored_fingerprint
from alpaca_lora.errors import AlpacaLoraError

# ---- helpers -------------------------------------------------------------------------------------


def outcome(load):
    """What a load gives: ("ok", format, features, records, warnings) or ("error", type, message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds, fmt = load()
        except AlpacaLoraError as exc:
            return "error", type(exc).__name__, str(exc)
    return "ok", fmt, ds.features, ds.to_list(), [str(w.message) for w in caught]


def streamed(source, cache_dir, **options):
    assert Path(source).suffix in stream.STREAMED
    return outcome(lambda: load_data(source, cache_dir=cache_dir, **options))


def whole(source, format="auto", column_map=None, skip_bad_records=False):
    """Today's path: every record read into Python objects, the Dataset built in memory."""
    return outcome(lambda: sources._load_whole(source, format, column_map, skip_bad_records))


def write(path: Path, records: list) -> Path:
    """Records as JSON Lines (any JSON values) or as Parquet (objects only)."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def alpaca(shared_data):
    gsm8k = json.loads((shared_data / "gsm8k_train_alpaca.json").read_text(encoding="utf-8"))[:150]
    roleplay = json.loads((shared_data / "gpteacher_roleplay_alpaca.json").read_text(encoding="utf-8"))[:150]
    return [r for pair in zip(gsm8k, roleplay, strict=True) for r in pair]  # inputs empty and not


@pytest.fixture(scope="module")
def sharegpt(shared_data):
    return json.loads((shared_data / "glaive_toolcall_sharegpt.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def messages(sharegpt):
    ds, _ = sources._load_whole(sharegpt, "auto", None, False)
    return ds.to_list()  # the normalized form, read back as messages (tool_call flags included)


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 7: writes, Parquet reads and the JSONL column sample all cross batch boundaries."""
    monkeypatch.setattr(stream, "BATCH", 7)


# ---- the same records as reading whole -----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("family", ["alpaca", "sharegpt", "messages"])
@pytest.mark.parametrize("batch", [7, stream.BATCH])
def test_streamed_records_equal_those_read_whole(request, tmp_path, monkeypatch, suffix, family, batch):
    monkeypatch.setattr(stream, "BATCH", batch)
    path = write(tmp_path / f"data{suffix}", request.getfixturevalue(family))
    expected = whole(path)
    assert expected[0] == "ok" and expected[1] == ("alpaca" if family == "alpaca" else family)
    assert streamed(path, tmp_path / "cache") == expected
    assert streamed(str(path), tmp_path / "cache") == expected  # from the cache
    ds, _ = load_data(path, cache_dir=tmp_path / "cache")
    assert ds.cache_files and Path(ds.cache_files[0]["filename"]).parent == tmp_path / "cache"  # memory-mapped


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_json_and_csv_are_still_read_whole(alpaca, tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(alpaca), encoding="utf-8")
    else:
        datasets.Dataset.from_list(alpaca).to_csv(str(path), index=False)
    assert outcome(lambda: load_data(path, cache_dir=tmp_path / "cache")) == whole(path)
    assert not (tmp_path / "cache").exists()


BAD_ALPACA = [
    {"instruction": "a", "output": "x"},
    {"instruction": "b"},
    ["not", "an", "object"],
    {"instruction": "", "output": "y"},
    {"instruction": "c", "input": 5, "output": "z"},
    {"instruction": "d", "input": "i", "output": "w"},
    {"instruction": "\ud800", "output": "v"},
    {"instruction": None, "output": "u"},
]
BAD_SHAREGPT = [
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    {"conversations": [{"from": "human", "value": "hi"}]},
    {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    {"conversations": "text"},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "loss_weight": 0.5}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{not json"},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("records", [BAD_ALPACA, BAD_SHAREGPT, BAD_ALPACA[1:3], BAD_SHAREGPT[1:4]])
def test_bad_records_raise_and_skip_exactly_as_read_whole(small_batches, tmp_path, records, skip):
    path = tmp_path / "data.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text[:20] + "\n{broken\n\n" + text[20:] + "  \n", encoding="utf-8", errors="surrogatepass")
    expected = whole(path, skip_bad_records=skip)
    assert streamed(path, tmp_path / "c", skip_bad_records=skip) == expected
    assert streamed(path, tmp_path / "c", skip_bad_records=skip) == expected  # a cached skip warns again
    assert expected[0] == "ok" or str(path) in expected[2]


def test_bad_parquet_records_and_files(small_batches, tmp_path):
    rows = [{"instruction": "a", "output": "x"}] * 9 + [{"instruction": "b", "output": None}]
    path = write(tmp_path / "data.parquet", rows)
    for skip in (False, True):
        assert streamed(path, tmp_path / "c", skip_bad_records=skip) == whole(path, skip_bad_records=skip)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert streamed(broken, tmp_path / "c")[:2] == ("error", "DataError")
    assert streamed(broken, tmp_path / "c") == whole(broken)
    empty = write(tmp_path / "empty.parquet", [])
    assert streamed(empty, tmp_path / "c") == whole(empty)


@pytest.mark.parametrize("body", [b"", b"  \n\t\n", b"\xef\xbb\xbf", b"\n\n", b"\xff\xfe{\x00}\x00",
                                  b"\xef\xbb\xbf{\"instruction\": \"a\", \"output\": \"b\"}",
                                  b"{\"instruction\": \"a\xff\", \"output\": \"b\"}\r\n{\"instruction\": 1}",
                                  b"[1]\n\"x\"\nnull\n", b"{\"a\":" * 50_000, b"\x00\x00"])
def test_degenerate_files_as_read_whole(tmp_path, body):
    path = tmp_path / "data.jsonl"
    path.write_bytes(body)
    for skip in (False, True):
        assert streamed(path, tmp_path / "c", skip_bad_records=skip) == whole(path, skip_bad_records=skip)
    assert streamed(tmp_path / "missing.jsonl", tmp_path / "c") == whole(tmp_path / "missing.jsonl")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.binary(max_size=200) | st.lists(st.sampled_from([b"\n", b"\r\n", b"\xef\xbb\xbf", b"\xe2", b"\x82\xac",
                                                                b"{}", b" ", b"\x00", b"\xff", b"\xe2\x80\xa8"]),
                                                max_size=12).map(b"".join))
def test_lines_read_one_at_a_time_are_those_of_the_text_split(data):
    """What reading whole did: decode everything (utf-8-sig, surrogateescape), then split at "\\n"."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        path.write_bytes(data)
        if not data.strip():
            with pytest.raises(AlpacaLoraError, match="is empty"):
                list(stream.file_lines(path))
        elif data[:2] in (b"\xff\xfe", b"\xfe\xff") or data[:4] == b"\x00\x00\xfe\xff":
            with pytest.raises(AlpacaLoraError, match="UTF-(16|32)"):
                list(stream.file_lines(path))
        else:
            split = data.decode("utf-8-sig", errors="surrogateescape").split("\n")
            # the same lines, but for the empty one the split makes after a last "\\n" (a blank line: skipped)
            assert list(stream.file_lines(path)) == (split[:-1] if data.endswith(b"\n") else split)


@pytest.mark.parametrize("family", ["alpaca", "sharegpt", "messages"])
def test_parquet_rows_read_a_batch_at_a_time_are_those_of_the_whole_table(request, tmp_path, small_batches, family):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(request.getfixturevalue(family)), path, row_group_size=50)
    table = pq.read_table(path)  # what reading whole did
    columns, rows, items = stream.open_parquet(path)
    assert columns == table.column_names and rows == table.num_rows
    assert [row for _, row, _ in items] == table.to_pylist()


# A key first seen after the first batch may change how every record is read: the file is read again.
LATE = {
    "input appears late": ([{"instruction": "i", "output": "o"}] * 8,
                           [{"instruction": "i", "input": "x", "output": "o"}]),
    "another layout": ([{"prompt": "p", "completion": "c"}] * 8, [{"instruction": "i", "output": "o"}]),
    "conversations": ([{"instruction": "i", "output": "o"}] * 8, BAD_SHAREGPT[:1]),
    "objects after non-objects": ([[1], "x", None, 5, [], {}, [2], 3], [{"messages": [], "instruction": "i"}]),
    "dolly context": ([{"instruction": "i", "input": "a", "response": "r"}] * 8,
                      [{"instruction": "i", "context": "c", "response": "r"}]),
    "nothing changes": ([{"instruction": "i", "output": "o"}] * 8, [{"instruction": "i", "output": "o", "x": 1}]),
}


@pytest.mark.parametrize("case", list(LATE))
@pytest.mark.parametrize("options", [{}, {"skip_bad_records": True}, {"format": "alpaca"},
                                     {"column_map": {"prompt": "instruction"}}, {"format": "sharegpt"}])
def test_keys_seen_late_read_as_read_whole(small_batches, tmp_path, monkeypatch, case, options):
    first, late = LATE[case]
    path = write(tmp_path / "data.jsonl", first + late + first[:3])
    reads = []

    class Counted(stream.FileItems):
        def __init__(self, *args, **kwargs):
            reads.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sources, "FileItems", Counted)
    assert streamed(path, tmp_path / "c", **options) == whole(path, **options)
    if not options:  # read again only when a late key changes the reading
        assert len(reads) == (1 if case == "nothing changes" else 2)


json_value = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4),
                          lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner,
                                                                                     max_size=2), max_leaves=4)
turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "x"]), "value": json_value},
                             optional={"role": st.sampled_from(["user", "assistant"]), "content": json_value})
turns = st.lists(turn, max_size=3)
record = st.fixed_dictionaries({}, optional={
    "instruction": st.sampled_from(["do", "", None, 1]), "output": st.sampled_from(["done", " ", [], None]),
    "input": json_value, "prompt": st.just("p"), "completion": st.just("c"), "context": st.just("ctx"),
    "response": st.just("r"), "messages": turns, "conversations": turns, "tools": st.sampled_from(["", "[]", "{"]),
})


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record | json_value, max_size=12), skip=st.booleans(),
       options=st.sampled_from([{}, {"format": "alpaca"}, {"format": "messages"}, {"format": "sharegpt"},
                                {"column_map": {"prompt": "instruction", "completion": "output"}}]))
def test_any_records_read_as_read_whole(monkeypatch, records, skip, options):
    monkeypatch.setattr(stream, "BATCH", 3)
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "data.jsonl", records)
        assert streamed(path, Path(folder) / "c", skip_bad_records=skip, **options) == whole(
            path, skip_bad_records=skip, **options)


def test_many_skips_keep_five_reasons_and_name_the_path_read(alpaca, tmp_path):
    rows = [r if i % 3 else {"instruction": r["instruction"]} for i, r in enumerate(alpaca)]
    path = write(tmp_path / "data.jsonl", rows)
    expected = whole(path, skip_bad_records=True)
    assert "skipped 100 bad record(s) of 300" in expected[4][0] and "(and 95 more)" in expected[4][0]
    assert streamed(path, tmp_path / "c", skip_bad_records=True) == expected
    sidecar = json.loads(next((tmp_path / "c").glob("*.json")).read_text())
    assert sidecar["skipped"]["count"] == 100 and len(sidecar["skipped"]["reasons"]) == 5
    moved = tmp_path / "elsewhere" / "copy.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(path.read_bytes())
    assert streamed(moved, tmp_path / "c", skip_bad_records=True) == whole(moved, skip_bad_records=True)
    assert len(list((tmp_path / "c").iterdir())) == 2  # the same entry, reused for the copy


# ---- the cache ------------------------------------------------------------------------------------


def _no_parsing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the file was parsed again")

    for module, name in ((stream, "jsonl_items"), (stream, "open_parquet"), (stream, "file_lines"),
                         (sources, "checked_records"), (sources, "checked_conversations")):
        monkeypatch.setattr(module, name, boom)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("family", ["alpaca", "sharegpt"])
def test_a_second_load_parses_nothing(request, tmp_path, monkeypatch, suffix, family):
    path = write(tmp_path / f"data{suffix}", request.getfixturevalue(family))
    first = streamed(path, tmp_path / "c", skip_bad_records=True)
    key = records_key(load_data(path, cache_dir=tmp_path / "c", skip_bad_records=True)[0])
    _no_parsing(monkeypatch)
    assert streamed(path, tmp_path / "c", skip_bad_records=True) == first
    again, _ = load_data(path, cache_dir=tmp_path / "c", skip_bad_records=True)
    assert records_key(again) == key and stored_fingerprint(again)["num_records"] == len(again)
    with pytest.raises(AssertionError, match="parsed again"):  # other options: another entry, parsed
        load_data(path, cache_dir=tmp_path / "c")


def test_the_key_follows_the_bytes_and_the_options(alpaca, tmp_path):
    path = write(tmp_path / "data.jsonl", alpaca)
    cache = tmp_path / "c"

    def key(p=path, **options):
        return records_key(load_data(p, cache_dir=cache, **options)[0])

    base = key()
    assert key() == base and key(str(path)) == base
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(path.read_bytes())
    assert key(copy) == base  # content, not place
    others = {key(format="alpaca"), key(skip_bad_records=True),
              key(column_map={"instruction": "instruction", "output": "output"})}
    assert base not in others and len(others) == 3
    data = bytearray(path.read_bytes())
    data[data.index(b"Natalia")] = ord("M")  # one byte
    copy.write_bytes(bytes(data))
    assert key(copy) not in {base, *others}
    assert load_data(copy, cache_dir=cache)[0][0]["instruction"].startswith("Matalia")
    assert len(list(cache.glob("*.arrow"))) == len(list(cache.glob("*.json"))) == 5


def test_an_interrupted_write_leaves_nothing_reusable(alpaca, tmp_path, monkeypatch):
    path = write(tmp_path / "data.jsonl", alpaca)
    cache = tmp_path / "c"
    real = sources.checked_records

    def interrupted(*args, **kwargs):
        for n, r in enumerate(real(*args, **kwargs)):
            if n == 100:
                raise KeyboardInterrupt
            yield r

    monkeypatch.setattr(sources, "checked_records", interrupted)
    monkeypatch.setattr(stream, "BATCH", 30)
    with pytest.raises(KeyboardInterrupt):
        load_data(path, cache_dir=cache)
    assert list(cache.iterdir()) == []  # the temporary file is removed
    monkeypatch.undo()
    assert streamed(path, cache) == whole(path)


def test_a_killed_process_leaves_no_entry_that_is_taken_for_complete(alpaca, tmp_path):
    """A process killed during the write (os._exit: no cleanup) leaves a .tmp file only, which is never read."""
    path = write(tmp_path / "data.jsonl", alpaca)
    cache = tmp_path / "c"
    child = textwrap.dedent(f"""
        import os
        from datasets.arrow_writer import ArrowWriter
        from alpaca_lora.data import sources, stream
        stream.BATCH = 50
        write_batch = ArrowWriter.write_batch
        def dying(self, *args, **kwargs):
            write_batch(self, *args, **kwargs)
            os._exit(9)
        ArrowWriter.write_batch = dying
        sources.load_data({str(path)!r}, cache_dir={str(cache)!r})
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr[-2000:]
    left = list(cache.iterdir())
    assert len(left) == 1 and left[0].name.endswith(".tmp") and left[0].stat().st_size > 0
    assert streamed(path, cache) == whole(path)
    key = records_key(load_data(path, cache_dir=cache)[0])
    (cache / f"{key}.json").unlink()  # killed between the Arrow file and its sidecar
    (cache / f"{key}.arrow").write_bytes(b"half a file")
    assert streamed(path, cache) == whole(path)
    (cache / f"{key}.json").write_text("{damaged")
    assert streamed(path, cache) == whole(path)


def test_an_unwritable_cache_dir_is_a_config_error(alpaca, tmp_path):
    path = write(tmp_path / "data.jsonl", alpaca[:3])
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = streamed(path, blocker / "cache")
    assert result[:2] == ("error", "ConfigError") and "cache_dir=" in result[2]


# ---- records_key and stored_fingerprint ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("family", ["alpaca", "sharegpt", "messages"])
def test_the_stored_fingerprint_is_data_fingerprint(request, tmp_path, small_batches, suffix, family):
    records = request.getfixturevalue(family)
    path = write(tmp_path / f"data{suffix}", records)
    for source in (path, str(path), path):  # the last one from the cache
        ds, _ = load_data(source, cache_dir=tmp_path / "c")
        assert stored_fingerprint(ds) == data_fingerprint(ds, source=source)
        assert stored_fingerprint(ds)["sha256"] == data_fingerprint(sources._load_whole(records, "auto", None,
                                                                                        False)[0])["sha256"]


def test_records_key_of_sources_read_whole(alpaca, tmp_path):
    def key(source, **options):
        ds, _ = load_data(source, **options)
        assert stored_fingerprint(ds) is None  # read whole: data_fingerprint computes it
        return records_key(ds)

    base = key(alpaca)
    assert base is not None and key([dict(r) for r in alpaca]) == base
    assert key(alpaca[::-1]) != base and key(alpaca, skip_bad_records=True) != base
    with pytest.warns(UserWarning, match="skipped 1 bad record"):
        assert key([*alpaca, {1: "x"}], skip_bad_records=True) is None  # JSON would write 1 as "1"
    assert key([*alpaca, {"instruction": "a", "output": "b", "when": {1, 2}}]) is None
    ds = datasets.Dataset.from_list(alpaca)
    assert key(ds) is not None and key(ds) == key(datasets.DatasetDict({"train": ds}))
    assert key(ds) != key(datasets.Dataset.from_list(alpaca[:-1]))
    path = tmp_path / "data.json"
    path.write_text(json.dumps(alpaca), encoding="utf-8")
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(alpaca), encoding="utf-8")
    assert key(path) == key(copy) != key(path, format="alpaca")
    loaded, _ = load_data(alpaca)
    assert records_key(loaded.select(range(3))) is None and records_key(ds) is None and records_key(alpaca) is None


# ---- bounded memory ------------------------------------------------------------------------------------

MEMORY_CHILD = """
import json, resource, sys, time
import datasets.arrow_writer, pyarrow.parquet  # imported before measuring: their import is not the data
from alpaca_lora.data.sources import load_data

def status(field):  # kB
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as file:
    file.write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
start = time.perf_counter()
ds, fmt = load_data(sys.argv[1], cache_dir=sys.argv[2])
elapsed = time.perf_counter() - start
grown = (status("VmHWM") - before) * 1024
start = time.perf_counter()
again, _ = load_data(sys.argv[1], cache_dir=sys.argv[2])
cached = time.perf_counter() - start
print(json.dumps({"n": len(ds), "last": ds[len(ds) - 1]["output"], "seconds": elapsed, "grown": grown,
                  "cached_seconds": cached}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures the peak RSS through Linux's /proc")
def test_200k_records_stream_in_bounded_memory(shared_data, tmp_path):
    real = json.loads((shared_data / "gsm8k_train_alpaca.json").read_text(encoding="utf-8"))
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as file:
        for i in range(200_000):
            r = real[i % len(real)]
            file.write(json.dumps({**r, "output": f"{r['output']} #{i}"}) + "\n")
    assert path.stat().st_size > 100e6
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(sources.__file__).parents[2]),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path), str(tmp_path / "c")], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["n"] == 200_000 and result["last"].endswith(" #199999")
    assert result["grown"] < 300e6, f"peak RSS grew by {result['grown'] / 1e6:.0f} MB"
    assert result["cached_seconds"] < 2.0, result
    print(f"200k records: {result['seconds']:.1f} s, peak RSS +{result['grown'] / 1e6:.0f} MB; "
          f"cached: {result['cached_seconds']:.2f} s")
