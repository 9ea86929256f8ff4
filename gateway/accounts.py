"""Teams and API keys: what the admin API and `sovereign keys|teams` do, on the database, with pydantic at the edge.

A key is `sk-sov-` + 43 random url-safe characters (256 bits), shown once at creation; the database keeps only its
SHA-256 (enough for a secret of this entropy: no salt or slow hash needed) and a short prefix for listings.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session

from gateway.db import ApiKey, Team, bump_generation, utcnow
from sovereign.errors import SovereignError

if TYPE_CHECKING:
    from gateway.audit_admin import AdminTrail

KEY_PREFIX = "sk-sov-"
PiiMode = Literal["off", "redact", "block"]
InjectionMode = Literal["off", "flag", "block"]
AuditContent = Literal["none", "hash", "redacted"]
BOOTSTRAP = "gateway-start"  # `by` of the changes a gateway makes for its bootstrap admin key
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "daily_tokens", "monthly_tokens")


class AccountError(SovereignError):
    code = "account_error"

    def __init__(self, message: str, *, code: str, status: int = 400) -> None:
        super().__init__(message, code=code)
        self.status = status


def generate_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# Upper bounds: what the columns hold (32-bit rpm and max_tokens) and what Redis's Lua numbers (doubles) still write
# back as integers (2**53); past them a database or the quota store failed with a 500/503.
MAX_INT32 = 2**31 - 1
MAX_TOKENS_LIMIT = 2**53


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1, le=MAX_INT32)
    tokens_per_minute: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    daily_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    monthly_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)


def _no_nul(v: str) -> str:
    if "\x00" in v:
        raise ValueError("must not contain a NUL character")
    return v


def _in_future(v: datetime | None) -> datetime | None:
    """A key's expiry: later than now, in UTC (a time without a zone is UTC; SQLite keeps a time's digits only)."""
    if v is None:
        return None
    v = v.astimezone(UTC) if v.tzinfo is not None else v.replace(tzinfo=UTC)
    if v <= utcnow():
        raise ValueError(f"is in the past ({v.isoformat()}); a key must expire later than now")
    return v


Expiry = Annotated[datetime | None, AfterValidator(_in_future)]


def _networks(v: list[str] | None) -> list[str] | None:
    """CIDRs or addresses, normalized (10.1.2.3/16 is 10.1.0.0/16); None is "from anywhere"."""
    if v is None:
        return None
    if not v:
        raise ValueError("is empty: a key must be usable from somewhere (revoke it instead)")
    from gateway.origin import parse_networks

    return [str(n) for n in parse_networks(v, "allowed_networks")]


Networks = Annotated[list[str] | None, Field(None, max_length=256), AfterValidator(_networks)]


class TeamSpec(Limits):
    """A team's policy. `allowed_models` are glob patterns over model ids, adapters included (`support@*`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    allowed_models: list[Annotated[str, AfterValidator(_no_nul)]] = Field(default_factory=lambda: ["*"])
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    pii: PiiMode = "off"
    injection: InjectionMode = "flag"
    audit_content: AuditContent = "hash"


class TeamUpdate(Limits):
    """Fields to change; a field left out keeps its value, a limit set to null removes it."""

    allowed_models: list[Annotated[str, AfterValidator(_no_nul)]] | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    pii: PiiMode | None = None
    injection: InjectionMode | None = None
    audit_content: AuditContent | None = None


class TeamOut(TeamSpec):
    created_at: datetime
    updated_at: datetime
    active_keys: int = 0


class KeySpec(Limits):
    team: str
    name: str = Field("", max_length=128)
    is_admin: bool = False
    # After this the key is refused everywhere, as if revoked: keys for contractors, pilots and rotation schedules
    # end on their own.
    expires_at: Expiry = None
    # Where the key may be used from (CIDRs or addresses); None: anywhere. A leaked copy is useless elsewhere.
    allowed_networks: Networks = None

    @field_validator("name", "team")
    @classmethod
    def _strip(cls, v: str) -> str:
        return _no_nul(v.strip())


class KeyOut(BaseModel):
    id: str
    team: str
    name: str
    prefix: str
    is_admin: bool
    limits: Limits
    created_at: datetime
    revoked_at: datetime | None = None
    expires_at: datetime | None = None
    allowed_networks: list[str] | None = None


class KeyUpdate(BaseModel):
    """What may change on a key without a new secret; `allowed_networks` null lets it be used from anywhere."""

    model_config = ConfigDict(extra="forbid")

    allowed_networks: Networks = None


class KeyRotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_seconds: int = Field(86_400, ge=0, le=366 * 86_400)  # how long the old secret keeps working
    expires_at: Expiry = None  # of the new key; by default it lives as long as the old one was meant to


class KeyCreated(KeyOut):
    secret: str  # shown once; only its hash is stored


def _team_out(t: Team, active_keys: int = 0) -> TeamOut:
    return TeamOut(name=t.name, allowed_models=list(t.allowed_models or []), max_tokens=t.max_tokens, pii=t.pii,
                   injection=t.injection, audit_content=t.audit_content,
                   **{f: getattr(t, f) for f in LIMIT_FIELDS}, created_at=t.created_at, updated_at=t.updated_at,
                   active_keys=active_keys)


def _key_out(k: ApiKey) -> KeyOut:
    return KeyOut(id=k.id, team=k.team, name=k.name, prefix=k.prefix, is_admin=k.is_admin,
                  limits=Limits(**{f: getattr(k, f) for f in LIMIT_FIELDS}), created_at=k.created_at,
                  revoked_at=k.revoked_at, expires_at=as_utc(k.expires_at), allowed_networks=k.allowed_networks)


def as_utc(t: datetime | None) -> datetime | None:
    """SQLite hands back a stored time without its zone; every time here is UTC."""
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


class Accounts:
    """Team and key operations on one database; each method is one transaction. With a `trail`, every change is
    then recorded in the audit trail (audit_admin.py); `by` names the admin key that asked for it."""

    def __init__(self, engine: Engine, trail: AdminTrail | None = None) -> None:
        self.engine = engine
        self.trail = trail

    def _record(self, action: str, team: str | None, by: str | None, **details: Any) -> None:
        if self.trail is None:
            return
        try:
            self.trail.record(action, team=team, by=by, **details)
        except Exception as exc:
            raise AccountError(f"the change was made, but its audit record could not be written: {exc}",
                               code="audit_unavailable", status=500) from None

    # teams -----------------------------------------------------------------------------------------------------
    def create_team(self, spec: TeamSpec, *, by: str | None = None) -> TeamOut:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            if s.get(Team, spec.name) is not None:
                raise AccountError(f"team {spec.name!r} already exists", code="team_exists", status=409)
            team = Team(**spec.model_dump())
            s.add(team)
            bump_generation(s)
            s.flush()
            out = _team_out(team)
        self._record("team.create", spec.name, by, policy=spec.model_dump(mode="json", exclude={"name"}))
        return out

    def get_team(self, name: str) -> TeamOut:
        with Session(self.engine) as s:
            team = self._team(s, name)
            return _team_out(team, self._active_keys(s, name))

    def list_teams(self) -> list[TeamOut]:
        with Session(self.engine) as s:
            teams = s.scalars(select(Team).order_by(Team.name)).all()
            return [_team_out(t, self._active_keys(s, t.name)) for t in teams]

    def update_team(self, name: str, changes: TeamUpdate, *, by: str | None = None) -> TeamOut:
        fields = changes.model_dump(exclude_unset=True)
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            team = self._team(s, name)
            before = _team_out(team).model_dump(mode="json")
            for field, value in fields.items():
                if value is None and field not in (*LIMIT_FIELDS, "max_tokens"):
                    continue
                setattr(team, field, value)
            team.updated_at = utcnow()
            bump_generation(s)
            s.flush()
            out = _team_out(team, self._active_keys(s, name))
        if diff := _changed(before, out.model_dump(mode="json"), fields):
            self._record("team.update", name, by, changes=diff)
        return out

    def delete_team(self, name: str, *, force: bool = False, by: str | None = None) -> int:
        """Delete a team and its keys; while a key still works it needs `force`. Returns the keys deleted."""
        with Session(self.engine) as s, s.begin():
            team = self._team(s, name)
            keys = s.scalars(select(ApiKey).where(ApiKey.team == name)).all()
            live = self._active_keys(s, name)
            if live and not force:
                raise AccountError(f"team {name!r} still has {live} working key(s); revoke them or pass force",
                                   code="team_has_keys", status=409)
            for k in keys:
                s.delete(k)
            s.flush()
            s.delete(team)
            bump_generation(s)
            deleted = [k.id for k in keys]
        self._record("team.delete", name, by, force=force, keys_deleted=deleted)
        return len(deleted)

    # keys ------------------------------------------------------------------------------------------------------
    def create_key(self, spec: KeySpec, *, secret: str | None = None, key_id: str | None = None,
                   by: str | None = None) -> KeyCreated:
        """A new key for `spec.team`; `secret` lets the bootstrap key be a value chosen outside."""
        secret = secret or generate_secret()
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            self._team(s, spec.team)
            key = ApiKey(id=key_id or "key_" + secrets.token_hex(8), team=spec.team, name=spec.name,
                         secret_hash=hash_secret(secret), prefix=secret[:12], is_admin=spec.is_admin,
                         expires_at=spec.expires_at, allowed_networks=spec.allowed_networks,
                         **{f: getattr(spec, f) for f in LIMIT_FIELDS})
            s.add(key)
            bump_generation(s)
            s.flush()
            out = _key_out(key)
        self._record("key.create", spec.team, by, **_key_details(out))
        return KeyCreated(**out.model_dump(), secret=secret)

    def list_keys(self, team: str | None = None, *, include_revoked: bool = False) -> list[KeyOut]:
        """Live keys; with `include_revoked`, revoked and expired ones too."""
        with Session(self.engine) as s:
            q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
            if team is not None:
                q = q.where(ApiKey.team == team)
            if not include_revoked:
                q = q.where(*_live())
            return [_key_out(k) for k in s.scalars(q).all()]

    def revoke_key(self, key_id: str, *, by: str | None = None) -> KeyOut:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            key = s.get(ApiKey, key_id)
            if key is None:
                raise AccountError(f"no key with id {key_id!r}", code="key_not_found", status=404)
            revoking = key.revoked_at is None
            if revoking:
                key.revoked_at = utcnow()
                bump_generation(s)
            s.flush()
            out = _key_out(key)
        if revoking:
            self._record("key.revoke", out.team, by, key=out.id, name=out.name)
        return out

    def update_key(self, key_id: str, changes: KeyUpdate, *, by: str | None = None) -> KeyOut:
        """Change a live key's networks; the secret stays."""
        fields = changes.model_dump(exclude_unset=True)
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            key = s.get(ApiKey, key_id)
            if key is None:
                raise AccountError(f"no key with id {key_id!r}", code="key_not_found", status=404)
            if key.revoked_at is not None:
                raise AccountError(f"key {key_id} is revoked; create a new key instead (`sovereign keys create`)",
                                   code="key_not_live", status=409)
            before = _key_out(key).model_dump(mode="json")
            for field, value in fields.items():
                setattr(key, field, value)
            bump_generation(s)
            s.flush()
            out = _key_out(key)
        if diff := _changed(before, out.model_dump(mode="json"), fields):
            self._record("key.update", out.team, by, key=key_id, changes=diff)
        return out

    def rotate_key(self, key_id: str, *, grace: timedelta, expires_at: datetime | None = None,
                   by: str | None = None) -> KeyCreated:
        """A new secret for a live key: a new key with its team, name, admin flag and limits, while the old one keeps
        working for `grace` (apps switch over without an outage), then expires. The new key lives as long as the old
        one was meant to (from now), unless `expires_at` says otherwise."""
        if grace < timedelta(0):
            raise AccountError("the grace period must not be negative", code="invalid_grace")
        secret = generate_secret()
        now = utcnow()
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            old = s.get(ApiKey, key_id)
            if old is None:
                raise AccountError(f"no key with id {key_id!r}", code="key_not_found", status=404)
            old_expiry = as_utc(old.expires_at)
            if old.revoked_at is not None or (old_expiry is not None and old_expiry <= now):
                raise AccountError(f"key {key_id} is {'revoked' if old.revoked_at else 'expired'}; create a new key "
                                   f"instead (`sovereign keys create`)", code="key_not_live", status=409)
            if expires_at is None and old_expiry is not None:
                expires_at = now + (old_expiry - as_utc(old.created_at))
            new = ApiKey(id="key_" + secrets.token_hex(8), team=old.team, name=old.name,
                         secret_hash=hash_secret(secret), prefix=secret[:12], is_admin=old.is_admin,
                         expires_at=expires_at, allowed_networks=old.allowed_networks,
                         **{f: getattr(old, f) for f in LIMIT_FIELDS})
            s.add(new)
            old.expires_at = min(now + grace, old_expiry) if old_expiry is not None else now + grace
            bump_generation(s)
            s.flush()
            out = _key_out(new)
            old_until = _key_out(old).expires_at
        self._record("key.rotate", out.team, by, key=key_id, key_expires_at=old_until.isoformat(),
                     **_key_details(out, "new_key"))
        return KeyCreated(**out.model_dump(), secret=secret)

    def ensure_bootstrap_key(self, secret: str, team: str = "admin") -> str:
        """Make `secret` a working admin key (idempotent); returns its key id."""
        digest = hash_secret(secret)
        with Session(self.engine) as s:
            existing = s.scalars(select(ApiKey).where(ApiKey.secret_hash == digest)).first()
            if existing is not None:
                return existing.id
            has_team = s.get(Team, team) is not None
        if not has_team:
            try:
                self.create_team(TeamSpec(name=team), by=BOOTSTRAP)
            except AccountError:
                pass  # another gateway replica created it a moment ago
        key_id = "key_bootstrap_" + digest[:8]
        try:
            self.create_key(KeySpec(team=team, name="bootstrap", is_admin=True), secret=secret, key_id=key_id,
                            by=BOOTSTRAP)
        except Exception:
            # Two replicas racing on the same bootstrap key: the loser finds the winner's row.
            with Session(self.engine) as s:
                if s.scalars(select(ApiKey).where(ApiKey.secret_hash == digest)).first() is None:
                    raise
        return key_id

    # helpers ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _team(s: Session, name: str) -> Team:
        team = s.get(Team, name)
        if team is None:
            raise AccountError(f"no team named {name!r}", code="team_not_found", status=404)
        return team

    @staticmethod
    def _active_keys(s: Session, team: str) -> int:
        return len(s.scalars(select(ApiKey.id).where(ApiKey.team == team, *_live())).all())


def _changed(before: dict, after: dict, fields: Any) -> dict[str, list]:
    """{field: [before, after]} for the fields asked to change that did."""
    return {f: [before[f], after[f]] for f in fields if f in after and before[f] != after[f]}


def _key_details(k: KeyOut, field: str = "key") -> dict[str, Any]:
    """A key as its change record keeps it (its id under `field`): never the secret, nor the prefix that starts it."""
    return {field: k.id, "name": k.name, "is_admin": k.is_admin,
            "expires_at": k.expires_at.isoformat() if k.expires_at else None, "allowed_networks": k.allowed_networks,
            "limits": k.limits.model_dump(mode="json", exclude_none=True)}


def _live() -> tuple:
    """Where-clauses of a key that works: not revoked, not expired."""
    return ApiKey.revoked_at.is_(None), or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > utcnow())
