"""The demo app: async CRUD for users and tasks, a task-event WebSocket, a legacy sync route, pool stats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from asgi_dbpool import DBPoolMiddleware
from asgi_dbpool.starlette import legacy_sessionmaker, session_scope

from .models import Base, Task, User

logger = logging.getLogger("demo_app")


class Hub:
    """In-process fan-out of task events to the open WebSockets."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[dict[str, Any]]] = set()

    def publish(self, kind: str, task: Task | dict[str, Any]) -> None:
        event = {"event": kind, "task": task if isinstance(task, dict) else task.to_dict()}
        for queue in self.queues:
            queue.put_nowait(event)


class BadRequest(Exception):
    pass


async def json_body(request: Request, *strings: str, integers: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object of the request; a 400 names every required field that is missing or of the wrong type."""
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body must be JSON") from None
    if not isinstance(body, dict):
        body = {}
    wrong = [f"{k} (a non-empty string)" for k in strings if not isinstance(body.get(k), str) or not body[k].strip()]
    wrong += [f"{k} (a whole number)" for k in integers if type(body.get(k)) is not int]
    if wrong:
        raise BadRequest(f"the body must be a JSON object with {', '.join(wrong)}")
    return body


def error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def create_app(engine: AsyncEngine, sync_engine: Engine, *, cleanup_interval: float = 30.0) -> DBPoolMiddleware:
    hub = Hub()
    LegacySession = legacy_sessionmaker(sync_engine)  # the report's SessionLocal

    # -- users -----------------------------------------------------------------------------------
    async def create_user(request: Request) -> Response:
        body = await json_body(request, "name", "email")
        async with session_scope(request) as session:
            user = User(name=body["name"].strip(), email=body["email"].strip())
            session.add(user)
            try:
                await session.commit()
            except IntegrityError:
                return error(409, f"a user with email {body['email']!r} exists")
            return JSONResponse(user.to_dict(), status_code=201)

    async def list_users(request: Request) -> Response:
        async with session_scope(request) as session:
            users = (await session.scalars(select(User).order_by(User.id))).all()
            return JSONResponse([u.to_dict() for u in users])

    async def get_user(request: Request) -> Response:
        async with session_scope(request) as session:
            user = await session.get(User, request.path_params["user_id"])
            return JSONResponse(user.to_dict()) if user else error(404, "no such user")

    async def delete_user(request: Request) -> Response:
        async with session_scope(request) as session:
            result = await session.execute(delete(User).where(User.id == request.path_params["user_id"]))
            await session.commit()
            return Response(status_code=204) if result.rowcount else error(404, "no such user")  # type: ignore[attr-defined]

    # -- tasks -----------------------------------------------------------------------------------
    async def create_task(request: Request) -> Response:
        body = await json_body(request, "title", integers=("user_id",))
        async with session_scope(request) as session:
            if await session.get(User, body["user_id"]) is None:
                return error(400, "user_id must name an existing user")
            task = Task(user_id=body["user_id"], title=body["title"].strip())
            session.add(task)
            await session.commit()
            hub.publish("created", task)
            return JSONResponse(task.to_dict(), status_code=201)

    async def list_tasks(request: Request) -> Response:
        async with session_scope(request) as session:
            tasks = (await session.scalars(select(Task).order_by(Task.id))).all()
            return JSONResponse([t.to_dict() for t in tasks])

    async def update_task(request: Request) -> Response:
        body = await json_body(request)
        async with session_scope(request) as session:
            task = await session.get(Task, request.path_params["task_id"])
            if task is None:
                return error(404, "no such task")
            if "done" in body:
                if not isinstance(body["done"], bool):
                    return error(400, "done must be true or false")
                task.done = body["done"]
            if "title" in body:
                if not isinstance(body["title"], str) or not body["title"].strip():
                    return error(400, "title must be a non-empty string")
                task.title = body["title"].strip()
            await session.commit()
            hub.publish("updated", task)
            return JSONResponse(task.to_dict())

    async def delete_task(request: Request) -> Response:
        async with session_scope(request) as session:
            task = await session.get(Task, request.path_params["task_id"])
            if task is None:
                return error(404, "no such task")
            gone = task.to_dict()
            await session.delete(task)
            await session.commit()
            hub.publish("deleted", gone)
            return Response(status_code=204)

    # -- the task-event stream: holds a session while open ------------------------------------------
    async def task_events(websocket: WebSocket) -> None:
        await websocket.accept()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        hub.queues.add(queue)
        try:
            async with session_scope(websocket) as session:
                tasks = (await session.scalars(select(Task).order_by(Task.id))).all()
                await websocket.send_json({"event": "snapshot", "tasks": [t.to_dict() for t in tasks]})
                incoming = asyncio.ensure_future(websocket.receive())
                next_event = asyncio.ensure_future(queue.get())
                try:
                    while True:
                        await asyncio.wait({next_event, incoming}, return_when=asyncio.FIRST_COMPLETED)
                        if incoming.done():
                            if incoming.result()["type"] == "websocket.disconnect":
                                return
                            incoming = asyncio.ensure_future(websocket.receive())  # client messages are ignored
                        if next_event.done():
                            await websocket.send_json(next_event.result())
                            next_event = asyncio.ensure_future(queue.get())
                finally:
                    incoming.cancel()
                    next_event.cancel()
        finally:
            hub.queues.discard(queue)

    # -- the legacy sync layer (deprecated: runs in a worker thread, warns on use) -----------------
    def legacy_users(request: Request) -> Response:
        with LegacySession() as session:
            users = session.scalars(select(User).order_by(User.id)).all()
            return JSONResponse({"users": [u.to_dict() for u in users], "layer": "sync (deprecated)"})

    # -- lifecycle ---------------------------------------------------------------------------------
    async def cleanup_loop() -> None:
        """Periodic cleanup: deletes finished tasks; registered with the middleware so shutdown stops it."""
        maker = async_sessionmaker(engine)
        while True:
            await asyncio.sleep(cleanup_interval)
            async with maker() as session:
                result = await session.execute(delete(Task).where(Task.done.is_(True)))
                await session.commit()
            if result.rowcount:  # type: ignore[attr-defined]
                logger.info("cleanup removed %d finished task(s)", result.rowcount)  # type: ignore[attr-defined]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        middleware.register_task(asyncio.create_task(cleanup_loop(), name="demo cleanup"))
        yield

    async def bad_request(request: Request, exc: Exception) -> Response:
        return error(400, str(exc))

    async def index(request: Request) -> Response:
        """What this demo serves."""
        endpoints = [
            f"{method} {route.path}"
            for route in inner.routes
            if isinstance(route, Route)
            for method in route.methods or ()
        ]
        endpoints = [e for e in endpoints if not e.startswith("HEAD ")]
        pool = middleware.stats_path
        endpoints += ["WEBSOCKET /ws/tasks", f"GET {pool}", f"GET {pool}/metrics", f"GET {pool}/ready"]
        endpoints.append(f"GET {pool}/advice")
        return JSONResponse({"endpoints": endpoints})

    inner = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/users", create_user, methods=["POST"]),
            Route("/users", list_users, methods=["GET"]),
            Route("/users/{user_id:int}", get_user, methods=["GET"]),
            Route("/users/{user_id:int}", delete_user, methods=["DELETE"]),
            Route("/tasks", create_task, methods=["POST"]),
            Route("/tasks", list_tasks, methods=["GET"]),
            Route("/tasks/{task_id:int}", update_task, methods=["PATCH"]),
            Route("/tasks/{task_id:int}", delete_task, methods=["DELETE"]),
            Route("/legacy/users", legacy_users, methods=["GET"]),
            WebSocketRoute("/ws/tasks", task_events),
        ],
        exception_handlers={BadRequest: bad_request},
        lifespan=lifespan,
    )
    middleware = DBPoolMiddleware(inner, engine, sync_engines=[sync_engine])
    return middleware
