"""One image listed under two ids: a manifest check by file identity, not by path.

Two rows whose paths differ can still name one image: a hard link, a symlink, `../x/` spelled two
ways (the same device and inode), or a copy (the same size and content fingerprint). Such a slide
can land in a training fold and a test fold under two slide ids, or under two patients: the split
would leak. `same_file_problems` names both rows of every such pair.

Cost: one stat per row; content is fingerprinted (2 MiB read, `slides.identity.file_fingerprint`)
only for files whose size another file shares. A DICOM series (a folder) is compared by its
folder's identity only.
"""

from __future__ import annotations

import os
from pathlib import Path


def same_file_problems(rows) -> list[str]:
    """One line per row whose file is the file of an earlier row: `rows` is [(where, path)] with
    `where` the row's description ('row 3 (slide_id 'B')'), optionally followed by the row's patient:
    two rows of one named patient always fall in the same patient-level fold, so one file under
    both cannot reach training and test and is not a problem. Missing paths are skipped (the
    manifest reports those itself), and so are empty files (no image to duplicate)."""
    from ..slides.identity import file_fingerprint

    by_inode: dict[tuple[int, int], tuple[str, Path]] = {}
    by_size: dict[int, list[tuple[str, Path]]] = {}
    problems = []
    patient_of = {}
    for row in rows:
        where, path = row[0], row[1]
        patient_of[where] = row[2] if len(row) > 2 else ""
        try:
            stat = os.stat(path)
        except OSError:
            continue
        if stat.st_size == 0 and not Path(path).is_dir():
            continue   # an empty file holds no image (the tile stage fails it); not a duplicate of one
        key = (stat.st_dev, stat.st_ino)
        if key in by_inode:
            first_where, first_path = by_inode[key]
            if _same_patient(patient_of, where, first_where):
                continue
            problems.append(f"{where}: {path} is the same file as {first_path} of {first_where} (a link or "
                            f"another spelling of its path): one image under two ids could be in "
                            f"training and test")
            continue
        by_inode[key] = (where, path)
        if Path(path).is_file():
            by_size.setdefault(stat.st_size, []).append((where, path))
    for size, group in by_size.items():
        if len(group) < 2:
            continue
        seen: dict[str, tuple[str, Path]] = {}
        for where, path in group:
            try:
                fingerprint = file_fingerprint(path, size)
            except OSError:
                continue
            if fingerprint in seen:
                first_where, first_path = seen[fingerprint]
                if _same_patient(patient_of, where, first_where):
                    continue
                problems.append(f"{where}: {path} has the same content as {first_path} of {first_where} "
                                f"(a copy): one image under two ids could be in training and test")
            else:
                seen[fingerprint] = (where, path)
    return problems


def _same_patient(patient_of: dict, a: str, b: str) -> bool:
    return bool(patient_of.get(a)) and patient_of.get(a) == patient_of.get(b)
