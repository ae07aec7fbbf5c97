"""Apps and what an operator does to them: create one with its modules and start tasks,
read and list them, move them between states, add or retry tasks, read semaphores."""
from __future__ import annotations

from typing import Iterable, Sequence

from psycopg.types.json import Jsonb

from ..errors import NotFound
from .rows import AppRow, Message, ModuleRow, Semaphore
from .tasks import TaskWrites


class Apps(TaskWrites):
    def create_app(self, app_json: dict, modules: list[dict], start: Iterable[tuple[str, str]],
                   status: str = "RUNNING") -> int:
        """App, modules and start tasks in one transaction: all or nothing."""
        with self._transaction():
            app_id = self._value("create_app", {"name": app_json["name"], "status": status,
                                                "site": app_json.get("site", "local"),
                                                "definition": Jsonb(app_json)})
            ids = {}
            for mod in modules:
                ids[mod["name"]] = self._value("create_module", {
                    "app_id": app_id, "name": mod["name"], "site": mod["site"],
                    "definition": Jsonb(mod), "host_bound": mod.get("task_dist_mode") == "HOST-BOUND",
                    "slots": mod.get("slots", 1), "min_workers": mod.get("min_workers", 0)})
            self._copy_start_tasks(app_id, [Message(ids[m], body) for m, body in start])
            if status == "RUNNING":
                self._run("notify_app_sites", {"app_id": app_id})
        return app_id

    def get_app(self, app_id: int) -> AppRow:
        app = self._row(AppRow, "get_app", {"app_id": app_id})
        if app is None:
            raise NotFound(f"no app with id {app_id} (see 'scalebox-hpc app list')")
        return app

    def list_apps(self, limit: int) -> list[AppRow]:
        """The newest ``limit`` apps, newest first."""
        return self._rows(AppRow, "list_apps", {"limit": limit})

    def set_app_status(self, app_id: int, status: str, from_states: Sequence[str],
                       message: str | None = None) -> bool:
        """Move the app to ``status`` if it is in one of ``from_states``, telling its
        workers; whether it moved."""
        with self._transaction():
            changed = self._value("set_app_status", {"app_id": app_id, "status": status,
                                                     "from_states": list(from_states), "message": message})
            if changed:
                self._run("notify_app_modules", {"app_id": app_id, "payload": status})
                if status == "RUNNING":
                    self._run("notify_app_sites", {"app_id": app_id})
        return changed is not None

    def modules(self, app_id: int) -> list[ModuleRow]:
        return self._rows(ModuleRow, "app_modules", {"app_id": app_id})

    def module_id(self, app_id: int, name: str) -> int:
        module_id = self._value("module_by_name", {"app_id": app_id, "name": name})
        if module_id is None:
            names = ", ".join(m.name for m in self.modules(app_id))
            raise NotFound(f"app {app_id} has no module '{name}' (modules: {names})")
        return module_id

    def insert_messages(self, app_id: int, messages: Sequence[Message]) -> dict[int, int]:
        """Insert tasks (dedup applies); returns inserted count per module id."""
        return self._insert_messages(app_id, messages)

    def add_tasks(self, app_id: int, module_id: int, bodies: Sequence[str], headers: dict) -> int:
        """Send messages to a module (a FINISHED app runs again); how many were new."""
        with self._transaction():
            self._run("reopen_app", {"app_id": app_id})
            counts = self._insert_messages(app_id, [Message(module_id, b, dict(headers)) for b in bodies])
        return sum(counts.values())

    def retry_tasks(self, app_id: int, task_ids: Sequence[int] = (), module_id: int | None = None,
                    codes: Sequence[int] = ()) -> int:
        """Make the app's failed tasks READY again (those the filters select; an empty
        filter selects all), reopening a FINISHED app; how many."""
        with self._transaction():
            self._run("reopen_app", {"app_id": app_id})
            rows = self._run("retry_tasks", {"app_id": app_id, "task_ids": list(task_ids) or None,
                                             "module_id": module_id, "codes": list(codes) or None}).fetchall()
            self._notify_ready({mid for _task_id, mid in rows})
        return len(rows)

    def semaphores(self, app_id: int) -> list[Semaphore]:
        return self._rows(Semaphore, "list_semaphores", {"app_id": app_id})

    def semaphore(self, app_id: int, name: str) -> int:
        value = self._value("get_semaphore", {"app_id": app_id, "name": name})
        if value is None:
            raise NotFound(f"app {app_id} has no semaphore '{name}'")
        return value
