"""Files from the Hugging Face hub through ``huggingface_hub`` (which honours ``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HOME`` and ``HF_HUB_OFFLINE``), every failure turned into one line that says what to do."""

from __future__ import annotations

from pathlib import Path

from kvbench.errors import UserError


def hub_file(repo_id: str, filename: str, *, repo_type: str, revision: str, what: str, remedy: str) -> Path:
    """The local path of ``filename`` in ``repo_id`` at ``revision`` (downloaded once into the hub cache).

    ``what`` names the caller in the error (e.g. ``task 'longbench/qasper'``), ``remedy`` what to do when the file
    is neither reachable nor cached.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import logging as hub_logging

    where = f"{repo_id}/{filename}@{revision[:12]}"
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # the client's retry warnings would bury the one line below
    try:
        # One probe without the client's retries (about 20 s of backoff when there is no network): unreachable
        # means the cache only; an HTTP answer lets hf_hub_download raise its typed error below.
        cached_only = constants.HF_HUB_OFFLINE
        if not cached_only:
            url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision)
            try:
                get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
            except HfHubHTTPError:
                pass
            except Exception:  # noqa: BLE001 (connection refused, DNS, timeout: the client's own error types)
                cached_only = True
        path = hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision, local_files_only=cached_only)
        return Path(path)
    except GatedRepoError as error:
        raise UserError(
            f"{what}: {where} is gated; accept its terms on the hub, then set HF_TOKEN or run `huggingface-cli login`"
        ) from error
    except RevisionNotFoundError as error:
        raise UserError(f"{what}: {repo_id} has no revision {revision} (pin an existing commit)") from error
    except RemoteEntryNotFoundError as error:
        raise UserError(f"{what}: {repo_id} at {revision[:12]} has no file {filename}") from error
    except RepositoryNotFoundError as error:
        raise UserError(
            f"{what}: {repo_id} not found on {constants.ENDPOINT}, or private: check the name, set HF_TOKEN "
            "or run `huggingface-cli login`"
        ) from error
    except LocalEntryNotFoundError as error:
        mode = "HF_HUB_OFFLINE=1 and it is not in the cache" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
        raise UserError(f"{what}: cannot get {where}: {mode} (cache: {constants.HF_HUB_CACHE}); {remedy}") from error
    except OSError as error:  # HTTP errors and the like, reduced to their first line
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"{what}: downloading {where} failed: {reason}") from error
    finally:
        hub_logging.set_verbosity(verbosity)
