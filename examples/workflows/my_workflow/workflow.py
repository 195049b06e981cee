"""The design document's example workflow, verbatim; its "workflow logic" is one activity.

Kept as the design shows it (typing.Dict, long lines): forgespace finds the @workflow.defn
class and the @activity.defn functions without WORKFLOW/ACTIVITIES exports, starts it with
``target_id``, and pins its activities to the host of its get_target.
"""

from datetime import timedelta
from typing import Any, Dict

from temporalio import workflow


@workflow.defn
class MyWorkflow:
    @workflow.run
    async def run(self, target_id: str) -> Dict[str, Any]:
        run_id = workflow.info().run_id
        target_path = await workflow.execute_activity(
            "get_target", args=[target_id, run_id, "isolated"], start_to_close_timeout=timedelta(minutes=5))
        # ... workflow logic ...
        inventory = await workflow.execute_activity(
            "inventory_workspace", args=[target_path, run_id], start_to_close_timeout=timedelta(minutes=5))
        await workflow.execute_activity(
            "cleanup_cache", args=[target_path, "isolated"], start_to_close_timeout=timedelta(minutes=1))
        return inventory
