"""Files that survive a crash, Ctrl-C or a full disk: every writer in the project goes through here.

atomic_write  a fresh temporary file beside the target (never a fixed NAME.tmp that a planted link could redirect),
              written, flushed and fsync'd, then renamed over the target: readers see the old file or the new one.
read_json     JSON with errors that name the file (and line) instead of a bare traceback.
inside        a path read from a data file, kept inside its root folder.
JSONL         append one record per write + fsync; a torn last line (a crash mid-write) is skipped on read and cut
              by repair_jsonl, so an append-only log of paid-for API replies is never lost or corrupted.
"""
import json
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
    return records


def append_jsonl(path, record) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")  # one write: a crash leaves at most a torn last line
        f.flush()
        os.fsync(f.fileno())


def _scan_jsonl(path):
    """(records, byte offset after the last good line). A bad line before the last one is corruption: an error."""
    with open(path, "rb") as f:
        content = f.read()
    complete = content[: content.rfind(b"\n") + 1]  # a tail without its newline is torn, even if it parses
    lines = complete.split(b"\n")[:-1]
    records, good_end = [], 0
    for i, line in enumerate(lines):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:  # UnicodeDecodeError is a ValueError too
                if i < len(lines) - 1:
                    raise ValueError(f"{path}: line {i + 1} is not valid JSON (corrupt file?)") from None
                break  # a garbled last line (a crash can leave zero bytes): torn
        good_end += len(line) + 1
    return records, good_end


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
