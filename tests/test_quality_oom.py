"""A CUDA out-of-memory inside any tab's models becomes a clear error, frees the store, and the next job works."""
from __future__ import annotations

import pytest
import torch

from quality_support import (
    assert_clear_error, client_for, hook_model_forwards, registered_tasks, run_job, shared_app, stats_of, submit,
    tab_case,
)

TASKS = registered_tasks()


def raise_oom() -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated by the OOM gate)")


@pytest.mark.parametrize("task", TASKS)
def test_simulated_cuda_oom_is_a_clear_error_frees_models_and_next_request_works(task):
    from gradio_client.exceptions import AppError

    app = shared_app()
    client = client_for(app.url)
    api = client.view_api(print_info=False, return_format="dict")
    case = tab_case(task, api["named_endpoints"][f"/generate_{task}"]["parameters"])
    run_job(submit(client, api, task, case.valid))
    assert app.store.loaded_names(), "the valid request loaded a model"

    unhook = hook_model_forwards(raise_oom)
    try:
        with pytest.raises(AppError) as error:
            run_job(submit(client, api, task, case.valid))
    finally:
        unhook()
    assert_clear_error(str(error.value), "out of memory")
    assert "Tried to allocate" not in str(error.value), "the raw CUDA message is replaced by what to do next"
    assert app.store.loaded_names() == [], "the model store unloads everything after an OOM"

    outputs = run_job(submit(client, api, task, case.valid))
    assert stats_of(outputs), "the request after the OOM failed"
    assert app.store.loaded_names(), "models load again after the OOM"
