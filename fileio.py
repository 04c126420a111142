"""Files that survive a crash, Ctrl-C or a full disk: every writer in the project goes through here.

atomic_write  a fresh temporary file beside the target (never a fixed NAME.tmp that a planted link could redirect),
              written, flushed and fsync'd, then renamed over the target: readers see the old file or the new one.
read_json     JSON with errors that name the file (and line) instead of a bare traceback.
inside        a path read from a data file, kept inside its root folder.
JSONL         append one record per write + fsync; a torn last line (a crash mid-write: no newline yet) is skipped on
              read and cut by repair_jsonl, so an append-only log of paid-for API replies is never lost or corrupted.
answer files  resume_jsonl continues one only when a sidecar says the same model and settings produced it.
"""
import argparse
import json
import math
import os
import tempfile

from safetensors.torch import save_file


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp/mkdtemp create 0600/0700 entries, ordinary files get 0666/0777 & ~umask


def fresh_dir(folder, name) -> str:
    """A fresh, empty folder .<name>.XXXX.tmp in `folder` (filled, then renamed into place), ordinary permissions."""
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


def atomic_write(path, write) -> None:
    """write(tmp_path) fills a fresh temporary file next to `path`; it replaces `path` only once complete."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would have made it, not mkstemp's owner-only 0600
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C or a bug: the target keeps its old content, no temp file stays
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path, content: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(content)
    atomic_write(path, write)


def write_json(path, obj, indent=2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def save_tensors(path, tensors: dict, metadata=None) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata or {"format": "pt"}))


def read_json(path):
    """A JSON file; a missing file raises FileNotFoundError, bad bytes or syntax a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:  # json recurses once per level: "[" * 100000 would end in a traceback
        raise ValueError(f"{path}: JSON nested too deeply to read") from None


def read_records(path) -> list:
    """A JSON list or a JSONL file (inputs are never torn: a bad line is an error naming the file and line)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if text.lstrip().startswith("["):
        return read_json(path)
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: invalid JSON: {e}") from None
        except RecursionError:
            raise ValueError(f"{path}, line {n}: JSON nested too deeply to read") from None
    return records


def append_jsonl(path, record) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")  # one write: a crash leaves at most a torn last line
        f.flush()
        os.fsync(f.fileno())


def _scan_jsonl(path):
    """(records, byte offset after the last complete line). Only a tail without its newline is torn: an append is
    one write ending in its newline, so a complete line that does not parse is corruption, an error naming it. (A
    crash can also leave an append's bytes as zeros: no newline among them either, so they are torn too.)"""
    with open(path, "rb") as f:
        content = f.read()
    complete = content[: content.rfind(b"\n") + 1]  # a tail without its newline is torn, even if it parses
    records = []
    for n, line in enumerate(complete.split(b"\n")[:-1], 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
            raise ValueError(f"{path}: line {n} is not valid JSON (corrupt file?)") from None
    return records, len(complete)


def read_jsonl(path) -> list:
    return _scan_jsonl(path)[0] if os.path.exists(path) else []


def repair_jsonl(path) -> list:
    """Cut a torn last line so that appending continues a valid file; returns the good records."""
    if not os.path.exists(path):
        return []
    records, good_end = _scan_jsonl(path)
    if good_end < os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
    return records


def inside(root, relative, where) -> str:
    """root/relative, or a ValueError naming `where` (file and row) when the path leaves root: ".." past it, or an
    absolute path elsewhere. Paths in data files are relative to their folder (LLaVA's JSON, question files); an
    absolute one is accepted only inside root, so passing "/" as root on purpose allows any. The check is on the
    text (normpath), not on symlinks: a link the user put inside root is theirs to follow."""
    if not isinstance(relative, str) or not relative.strip() or "\0" in relative:
        raise ValueError(f"{where}: {relative!r} is not a file path")
    base = os.path.abspath(root)
    if os.path.commonpath([base, os.path.abspath(os.path.join(base, relative))]) != base:
        raise ValueError(f"{where}: path {relative!r} leaves the folder {root} (an absolute path or '..'); paths in "
                         "data files are relative to it")
    return os.path.normpath(os.path.join(root, relative))


def require(record, key, where):
    """record[key], or an error naming where the record came from (file and row)."""
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{where}: missing key {key!r}")
    return record[key]


def require_id(record, key, where):
    """record[key] as a question id: a string or an integer (answers are kept and matched by id), or an error naming
    where the record came from."""
    value = require(record, key, where)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError(f"{where}: {key!r} {value!r:.80} is not a string or an integer")
    return value


def check_unique(ids, where) -> None:
    """A ValueError naming the repeated ids: answers are kept by id, so two questions with one id would share one."""
    seen, repeated = set(), []
    for i in ids:
        if i in seen and i not in repeated:
            repeated.append(i)
        seen.add(i)
    if repeated:
        raise ValueError(f"{where}: question ids repeated: {', '.join(map(repr, repeated[:5]))}"
                         f"{' ...' if len(repeated) > 5 else ''} (every question needs its own id)")


# -----------------------------------------------------------------------------------------------------------------
# answer files that record what produced them


def _flat(value, prefix=""):
    """{"answers": {"model": m}} -> {"answers.model": m}: a difference deep in a source is named by its path."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def resume_jsonl(path, source) -> list:
    """The records of the JSONL answer file `path` (a torn last line cut), once it is certain that `source` produced
    them. source: what the answers depend on, a JSON object (model folder and weights fingerprint, template and
    prompt settings; or an API model and its settings). It is kept in the sidecar PATH.source.json, because answer
    files are LLaVA's format, read by its scripts, with no room for it. A file without answers (re)writes the
    sidecar; one with answers is continued only when its sidecar holds the same source, else a ValueError says what
    differs: answers of two models or prompts never mix in one file."""
    records, sidecar = repair_jsonl(path), path + ".source.json"
    source = json.loads(json.dumps(source))  # as it reads back from the sidecar (tuples become lists)
    for n, record in enumerate(records, 1):
        require(record, "question_id", f"{path}, record {n}")
    if not records:
        write_json(sidecar, source)
        return records
    restart = f"answer into another --out, or delete {path} to start it again"
    if not os.path.exists(sidecar):
        raise ValueError(f"{path}: holds answers ({len(records)}) but no {sidecar} recording what produced them, "
                         f"so they cannot be checked against this run; {restart}")
    there, now = _flat(read_json(sidecar)), _flat(source)

    def shown(values, key):
        return repr(values[key]) if key in values else "nothing"
    differ = [f"{key} {shown(there, key)} there, {shown(now, key)} now" for key in sorted(set(there) | set(now))
              if key not in there or key not in now or there[key] != now[key]]
    if differ:
        raise ValueError(f"{path}: its answers ({len(records)}) were made with other settings (recorded in "
                         f"{sidecar}): {'; '.join(differ)}; {restart}")
    return records


# -----------------------------------------------------------------------------------------------------------------
# numbers on the command line, checked by the parser (a usage error, exit 2) before anything runs


def number(kind=int, low=1, high=math.inf, low_open=False):
    """An argparse type: a finite `kind` in [low, high] ((low, high] with low_open), so --batch-size 0 or --max-wait
    nan is refused naming the flag."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            bound = f"at least {low}" if high == math.inf and not low_open else \
                f"in {'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return parse
