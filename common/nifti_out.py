"""Every NIfTI file fedseg writes goes through here: free-text header fields cleared, owner-only access.

A prediction copies its input's header so that it lands on exactly the
scan's grid. That header may carry what a PACS export put there: a
patient's name, birth date or record number in ``descrip``, ``db_name`` or
``aux_file``, or whole DICOM headers in extensions. None of it is needed to
read the label map, so it is cleared before the file is written, and the file
is readable by its owner only (it is patient data).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib

from .private import private_file

FREE_TEXT_FIELDS = ("descrip", "db_name", "aux_file", "intent_name")


def cleared(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """``image`` with every free-text header field emptied and its extensions removed (in place)."""
    header = image.header
    for name in FREE_TEXT_FIELDS:
        if name in header:
            header[name] = b""
    header.extensions.clear()
    image.extra.clear()
    return image


def save_nifti(image: nib.Nifti1Image, path: Path | str) -> None:
    """Write ``image`` to ``path`` with its free-text header cleared, readable by the owner only."""
    nib.save(cleared(image), str(private_file(path)))
