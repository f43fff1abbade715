"""A Hugging Face hub id as ``--model``, from this machine's hub cache.

``--model BAAI/bge-small-en-v1.5`` is what a transformers user types first. lmbatch
downloads nothing from a hub (a job's nodes fetch models from the storage they share:
a directory or a URI), but a model that ``hf download`` or an earlier
``from_pretrained`` left in the local cache is a directory already: its snapshot.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmbatch.actors.storage import is_uri

# owner/name as the hub spells them: one slash, no leading dot or slash.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def hub_snapshot(model: str) -> str:
    """``model`` as given, or where it is a hub id and no path here, the folder of
    its snapshot in the hub cache (``HF_HUB_CACHE``, default
    ``~/.cache/huggingface/hub``) at the revision ``main`` points to.

    Raises:
        ValueError: a hub id that is not in the cache, saying how to get it there.
    """
    if is_uri(model) or not HUB_ID.fullmatch(model) or Path(model).exists():
        return model
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(model, local_files_only=True)
    except LocalEntryNotFoundError:
        raise ValueError(
            f"{model} is no directory here, nor in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); lmbatch downloads nothing from a hub: run "
            f"`hf download {model}` first, or give a directory or URI"
        ) from None
