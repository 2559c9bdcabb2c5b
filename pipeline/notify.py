"""`python -m pipeline notify --url URL`: a person hears about a failed retrain, a failed category
and a rejected candidate, through a Prefect automation on a self-hosted (or Cloud) server.

The retrain flow emits Prefect events (pipeline/flows.py ``announce``): ``urd.retrain.failed``,
``urd.category.failed`` and ``urd.promotion.rejected``, each with the category, model and reason
in its payload. This command saves a Webhook block ``urd-notify`` (POST to ``URL``) and an
automation ``urd: notify`` that calls it for each of those events. Running it again updates both.
Any receiver that takes a JSON POST works: a chat webhook, an incident tool, a small relay.
"""

from __future__ import annotations

from typing import Any

EVENTS = ("urd.retrain.failed", "urd.category.failed", "urd.promotion.rejected")
BLOCK = "urd-notify"
AUTOMATION = "urd: notify"
# Rendered by the server for each event (Jinja): one JSON object a receiver can route on.
PAYLOAD = ('{"event": "{{ event.event }}", "category": "{{ event.payload.category }}", "model": "{{ event.payload.model }}", '
           '"version": "{{ event.payload.version }}", "text": {{ (event.payload.reason or event.payload.error or "") | tojson }}, '
           '"occurred": "{{ event.occurred }}"}')


def install(url: str) -> dict[str, Any]:
    """Save the webhook block and the automation (replacing earlier ones of the same names)."""
    from prefect.automations import Automation
    from prefect.blocks.webhook import Webhook
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import EventTrigger, Posture

    from .flows import require_server

    require_server()
    # allow_private_urls: the receiver is usually on the factory's own network (or this host).
    block_id = Webhook(method="POST", url=url, headers={"Content-Type": "application/json"}, allow_private_urls=True).save(BLOCK, overwrite=True)
    for old in _automations(AUTOMATION):
        old.delete()
    automation = Automation(
        name=AUTOMATION,
        description="urd: a retrain run or a category failed, or the promotion gate rejected a candidate",
        trigger=EventTrigger(expect=set(EVENTS), match={"prefect.resource.id": "urd.*"}, posture=Posture.Reactive, threshold=1),
        actions=[CallWebhook(block_document_id=block_id, payload=PAYLOAD)],
    ).create()
    return {"block": BLOCK, "block_id": str(block_id), "automation": AUTOMATION, "automation_id": str(automation.id), "events": list(EVENTS), "url": url}


def _automations(name: str) -> list:
    from prefect.automations import Automation

    try:
        found = Automation.read(name=name)
    except Exception:  # none of that name yet
        return []
    return found if isinstance(found, list) else [found]
