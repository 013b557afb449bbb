"""Finding a benchmark's files under --data-dir and reading them, with one-line errors.

--data-dir is LLaVA's `playground/data/eval` folder (docs/Evaluation.md in haotian-liu/LLaVA: its eval.zip
plus each benchmark's official files) or one benchmark's folder in it.
"""

import json
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import DataError
from ..paths import inside

LLAVA_EVAL_ZIP = "LLaVA's eval.zip (haotian-liu/LLaVA docs/Evaluation.md), extracted to playground/data/eval"


def task_folder(data_dir: Path, names: Optional[tuple[str, ...]]) -> Path:
    """The benchmark's folder: DIR/<name> for the first of its LLaVA folder names that exists, else DIR.

    `names` None: the task takes DIR as given, a file or a folder (`custom`).
    """
    data_dir = Path(data_dir).expanduser()
    if not data_dir.exists():
        raise DataError(f"--data-dir {data_dir} does not exist", "give LLaVA's playground/data/eval folder")
    if names is None:
        return data_dir
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a folder", "give LLaVA's playground/data/eval folder")
    for name in names:
        if (data_dir / name).is_dir():
            return data_dir / name
    return data_dir


def require(path: Path, source: str) -> Path:
    """`path`, or a one-line error naming it and where it comes from."""
    if not path.exists():
        raise DataError(f"{path} is missing", f"it comes from {source}")
    return path


def read_json(path: Path, source: str) -> Any:
    require(path, source)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON: {e}", f"get it again from {source}") from None


def read_jsonl(path: Path, source: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    require(path, source)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number} is not valid JSON: {e}", f"get it again from {source}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number} is not a JSON object", f"get it again from {source}")
            yield number, record


def get(record: dict, key: str, where: str) -> Any:
    """record[key], or a one-line error naming the record's place (`where`)."""
    if key not in record:
        raise DataError(f"{where} has no {key!r} field", "give the benchmark's official file")
    return record[key]


def int_or_same(value: Any) -> Any:
    """`value` as an int when it reads as one: ids that are numbers in one file and digit strings in another."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def image_in(folder: Path, name: Any, where: str) -> Path:
    """`folder / name`, once its real path (symlinks resolved) is known to stay inside `folder`."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise DataError(f"{where}: the image name {name!r} is not a file name", "name a file inside the benchmark's folder")
    if inside(folder, name) is None:
        raise DataError(f"{where}: the image {name!r} lies outside {folder}", "keep the benchmark's images inside its folder")
    return Path(folder) / name

