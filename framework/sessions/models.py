"""Request and response models of the session API.

These pydantic models are the single source of truth for what the API accepts and
returns: handlers validate with them and ``/openapi.json`` is generated from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MUTATION_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_BATCH = 500
MAX_TEXT = 20_000
MAX_NAME = 200
MAX_MS = 7 * 24 * 3600 * 1000  # a week of audio; anything longer is a client bug

SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN, min_length=1, max_length=64)]
MutationId = Annotated[str, Field(pattern=MUTATION_ID_PATTERN, min_length=1, max_length=128)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
SpeakerLabel = Annotated[str, Field(min_length=1, max_length=64)]


def _integral(value: Any) -> Any:
    """JSON has one number type: ``1500.0`` is the integer 1500 (JSON Schema agrees)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Millis = Annotated[int, Field(ge=0, le=MAX_MS), BeforeValidator(_integral)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Participant(_Strict):
    name: Name


class CreateSession(_Strict):
    session_id: SessionId | None = None
    title: Annotated[str, Field(max_length=MAX_NAME)] | None = None
    participants: Annotated[list[Participant], Field(max_length=100)] = []


class _MutationBase(_Strict):
    id: MutationId | None = None


class Utterance(_MutationBase):
    """One speaker label talking from ``start_ms`` to ``end_ms`` (not before ``start_ms``)."""

    type: Literal["utterance"]
    speaker: SpeakerLabel
    start_ms: Millis
    end_ms: Millis
    text: Annotated[str, Field(max_length=MAX_TEXT)]

    @model_validator(mode="after")
    def _ordered(self) -> Utterance:
        if self.end_ms < self.start_ms:
            raise ValueError("end_ms must be greater than or equal to start_ms")
        return self


class ParticipantJoined(_MutationBase):
    type: Literal["participant_joined"]
    name: Name


class ParticipantLeft(_MutationBase):
    type: Literal["participant_left"]
    name: Name


class SpeakerRenamed(_MutationBase):
    type: Literal["speaker_renamed"]
    speaker: SpeakerLabel
    name: Name


class Note(_MutationBase):
    type: Literal["note"]
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


Mutation = Annotated[
    Utterance | ParticipantJoined | ParticipantLeft | SpeakerRenamed | Note,
    Field(discriminator="type"),
]


class EmptyBody(_Strict):
    """Action endpoints (resolve, finalize) take no body; ``{}`` is accepted too."""


class MutationBatch(_Strict):
    mutations: Annotated[list[Mutation], Field(min_length=1, max_length=MAX_BATCH)]


class AcceptedMutation(BaseModel):
    id: str | None
    seq: int
    duplicate: bool


class MutationsAccepted(BaseModel):
    accepted: list[AcceptedMutation]
    last_seq: int


class StoredMutation(BaseModel):
    """A mutation as read back: its payload plus ``seq`` (and ``id`` if it had one)."""

    model_config = ConfigDict(extra="allow")
    seq: int
    id: str | None
    type: str


class MutationPage(BaseModel):
    mutations: list[StoredMutation]
    next_after: int | None


class StageInfo(BaseModel):
    name: str
    state: Literal["pending", "running", "succeeded", "failed", "timed_out", "skipped"]
    duration_ms: int | None


class JobError(BaseModel):
    title: str
    detail: str


class FinalizeJob(BaseModel):
    state: Literal["running", "succeeded", "failed", "timed_out"]
    attempt: int
    budget_ms: int | None
    elapsed_ms: int
    stages: list[StageInfo]
    error: JobError | None


class FinalizeJobEnvelope(BaseModel):
    job: FinalizeJob


class Session(BaseModel):
    session_id: str
    state: Literal["open", "finalizing", "finalized", "failed"]
    title: str | None
    participants: list[Participant]
    mutation_count: int
    last_seq: int
    speakers: dict[str, str]
    finalize: FinalizeJob | None


class ResolveResult(BaseModel):
    speakers: dict[str, str]
    #: Present (true) only when the fallback answered instead of the configured provider.
    degraded: bool = False


class SpeakerStats(BaseModel):
    speaker: str
    name: str | None
    talk_time_ms: int
    turns: int
    longest_monologue_ms: int
    interruptions: int


class ActionItem(BaseModel):
    owner: str | None
    text: str


class Report(BaseModel):
    session_id: str
    title: str | None
    summary: str
    highlights: list[str]
    action_items: list[ActionItem]
    stats: dict[str, Any]
    speakers: list[SpeakerStats]
    timeline: list[dict[str, Any]]
    generated_at: str
    #: Present (true) only when the fallback wrote the summary instead of the configured provider.
    degraded: bool = False


class Problem(BaseModel):
    """RFC 9457 problem details, as every error response carries."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str
    errors: list[dict[str, Any]] | None = None
    #: Upstream failures and refusals: the decision's reason code (ballast.telemetry.Reason).
    kind: str | None = None
