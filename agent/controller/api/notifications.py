"""GET /v1/notifications: the deliveries of webhooks and e-mail (operators
only), newest first: each event, where it went, delivered, pending (with
the next attempt's time) or failed, how many attempts and the last error
(docs/notifications.md)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import func, select

from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.envelope import ok
from agent.controller.api.shapes import answers, v1
from agent.controller.config import EVENTS
from agent.controller.models import Notification
from agent.errors import PermissionDenied

STATUSES = ("pending", "delivered", "failed")

router = APIRouter(prefix="/v1/notifications", tags=["notifications"])


def to_json(n: Notification) -> dict:
    return {
        "id": n.id,
        "event": n.event,
        "subject": n.subject,
        "channel": "email" if n.channel == "email" else "webhook",
        "target": n.target,
        "status": n.status,
        "attempts": n.attempts,
        "next_attempt_at": n.next_at if n.status == "pending" else None,
        "last_error": n.last_error,
        "created_at": n.created_at,
        "delivered_at": n.delivered_at or None,
        "payload": json.loads(n.payload_json),
    }


@router.get("", **answers(v1.NotificationListAnswer))
def list_(
    request: Request,
    status: str = Query(""),
    event: str = Query(""),
    page_num: int = Query(0),
    page_size: int = Query(100),
    caller: Caller = Depends(authenticated),
):
    if not caller.operator:
        raise PermissionDenied(
            "authorization: notifications are visible to operator tokens only", field="authorization"
        )
    q = select(Notification)
    if status:
        if status not in STATUSES:
            raise v.bad("status", f"{status!r}: one of {', '.join(STATUSES)}")
        q = q.where(Notification.status == status)
    if event:
        if event not in EVENTS:
            raise v.bad("event", f"{event!r}: one of {', '.join(EVENTS)}")
        q = q.where(Notification.event == event)
    offset, limit = v.page(page_num, page_size)
    with context(request).db.session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery()))
        q = q.order_by(Notification.created_at.desc(), Notification.id).offset(offset)
        rows = s.scalars(q.limit(limit) if limit else q).all()
        return ok({"total_count": total, "list": [to_json(n) for n in rows]})
