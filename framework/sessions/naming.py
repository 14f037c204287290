"""Finalize names the speakers nobody named, so a report speaks of people, not labels.

Clients forget to call resolve. Finalize's ``reconcile`` stage therefore asks the
configured provider the same question resolve asks (the builtin heuristics, or a model
under the job's time budget) for every label the log left unnamed. A name the client
set (rename or an earlier resolve) is never replaced: the provider is told those names
and only labels without one take its answer. If inference fails, the unnamed labels
stay labels and the report says so (``speaker_naming.state == "unavailable"``); the job
itself does not fail over a missing name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ballast.errors import Overloaded, UpstreamError
from ballast.inference import InferenceProvider, ResolveInput
from ballast.logging import get_logger
from ballast.sessions.analysis import SessionState

log = get_logger("ballast.finalize")

NamingState = Literal["complete", "partial", "unavailable"]


@dataclass(slots=True)
class Naming:
    """What finalize found: ``inferred`` names for labels the log left unnamed.

    ``state`` is ``complete`` (every label that spoke has a name), ``partial`` (the
    provider answered, but some labels gave no evidence of who they are) or
    ``unavailable`` (inference failed; unnamed labels are reported as labels).
    """

    state: NamingState
    inferred: dict[str, str] = field(default_factory=dict)

    def report_field(self) -> dict[str, Any]:
        return {"state": self.state, "inferred": dict(self.inferred)}


async def name_unnamed(provider: InferenceProvider, session_id: str, state: SessionState) -> Naming:
    """Ask ``provider`` to name the labels of ``state`` that have no name yet."""
    unnamed = [label for label in state.labels if not state.speakers.get(label)]
    if not unnamed:
        return Naming("complete")
    try:
        reply = await provider.resolve(ResolveInput(
            session_id, state.participant_names(), state.utterances(), known=dict(state.speakers)))
    except (UpstreamError, Overloaded) as exc:
        log.warning("finalize.naming_unavailable", session_id=session_id, provider=provider.name,
                    kind=getattr(exc, "kind", type(exc).__name__), unnamed=len(unnamed))
        return Naming("unavailable")
    inferred: dict[str, str] = {}
    for label in unnamed:
        name = reply.mapping.get(label)
        if isinstance(name, str) and name.strip():
            inferred[label] = " ".join(name.split())
    return Naming("complete" if len(inferred) == len(unnamed) else "partial", inferred)
