"""The task registry every example shares (import it from producers and workers)."""

from stem import TaskContext, TaskHandler, TaskOptions, TaskRegistry

registry = TaskRegistry()


@registry.task("email.send", options=TaskOptions(max_retries=2))
def send_email(ctx: TaskContext, to: str, subject: str = "") -> str:
    return f"sent to {to} (attempt {ctx.attempt})"


@registry.task("flaky.sync", options=TaskOptions(max_retries=3))
def flaky(ctx: TaskContext, fail_times: int = 2) -> str:
    if ctx.attempt < fail_times:
        raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
    return f"succeeded on attempt {ctx.attempt}"


class Report(TaskHandler):
    name = "report.generate"
    options = TaskOptions(queue="reports")

    def run(self, ctx: TaskContext, report_id: int) -> dict:
        return {"report": report_id, "rows": report_id * 10}


registry.register(Report())
