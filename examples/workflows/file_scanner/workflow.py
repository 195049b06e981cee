"""A FuzzForge-style workflow: shared workspace, activities called by name, no forgespace API.

Written the way FuzzForge's packages are: a ``@workflow.defn`` class whose run method takes
``target_id`` and the parameters of metadata.yaml (in the same order), ``get_target`` with the
workflow id as run id in ``shared`` mode, then its own activity, ``upload_results`` and
``cleanup_cache``, all on the default task queue.
"""

from datetime import timedelta
from typing import Any, Dict, List, Optional

from temporalio import workflow
from temporalio.common import RetryPolicy


@workflow.defn
class FileScannerWorkflow:
    @workflow.run
    async def run(
        self,
        target_id: str,
        patterns: Optional[List[str]] = None,
        max_file_size: int = 10485760,
        check_sensitive: bool = True,
    ) -> Dict[str, Any]:
        workflow_id = workflow.info().workflow_id
        workflow.logger.info(f"Starting FileScannerWorkflow (workflow_id={workflow_id})")
        target_path = await workflow.execute_activity(
            "get_target",
            args=[target_id, workflow_id, "shared"],
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
        try:
            scan = await workflow.execute_activity(
                "scan_files",
                args=[
                    target_path,
                    {
                        "patterns": patterns or ["*"],
                        "max_file_size": max_file_size,
                        "check_sensitive": check_sensitive,
                    },
                ],
                start_to_close_timeout=timedelta(minutes=10),
            )
            results_url = await workflow.execute_activity(
                "upload_results",
                args=[workflow_id, scan, "json"],
                start_to_close_timeout=timedelta(minutes=2),
            )
        finally:
            await workflow.execute_activity(
                "cleanup_cache",
                args=[target_path, "shared"],
                start_to_close_timeout=timedelta(minutes=1),
            )
        return {
            "workflow_id": workflow_id,
            "target_id": target_id,
            "status": "success",
            "target_path": target_path,
            "findings": scan["findings"],
            "summary": scan["summary"],
            "results_url": results_url,
        }
