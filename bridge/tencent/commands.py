"""The command registry: what each Tencent callback command must contain, whom it belongs to, how it is keyed.

Every command is accepted. A known command has its documented fields type-checked; the command's family
(the word before the first dot) decides the topic and the owning entity that picks the partition. Commands
the bridge does not know yet (Tencent keeps adding them) pass unchecked.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from bridge.errors import InvalidField
from bridge.tencent.protocol import json_type

_DECIMAL = re.compile(r"[0-9]{1,19}")
_INT64_MAX = 2**63 - 1
MAX_ID_BYTES = 256
"""The most UTF-8 bytes of a field that names the owning entity or goes into the record key (`MsgKey`,
`Official_Account`, `GroupId`, `From_Account`...). Tencent's own limits are far lower: a UserID is at most
32 bytes, a custom group ID 48, and a MsgKey is three decimal numbers joined by `_`. 256 leaves five times
the margin, while a hostile value can no longer make the partition hash (pure Python, on the event loop),
the partition cache or the dedup window pay for megabytes."""


class TopicGroup(StrEnum):
    """Which of the bridge's topics a callback goes to; each has its own `--...-topic` setting."""

    OFFICIAL_ACCOUNT = "official_account"
    C2C = "c2c"
    GROUP = "group"
    USER = "user"
    APP = "app"
    UNKNOWN = "unknown"


# --- field checks: each returns what is wrong with a value, or None ---------------------------------------

FieldCheck = Callable[[Any], str | None]


def string(value: Any) -> str | None:
    return None if isinstance(value, str) else f"must be a string, got {json_type(value)}"


def non_empty_string(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a non-empty string, got {json_type(value)}"
    return None if value else "must be a non-empty string, got an empty string"


def integer(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    return f"must be an integer, got {json_type(value)}"


def event_time(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return None
    return f"must be an integer of milliseconds (or its decimal string), got {json_type(value)}"


def array(value: Any) -> str | None:
    return None if isinstance(value, list) else f"must be an array, got {json_type(value)}"


def json_object(value: Any) -> str | None:
    return None if isinstance(value, dict) else f"must be an object, got {json_type(value)}"


def msg_body(value: Any) -> str | None:
    """`MsgBody`: an array of message elements, each an object with a string `MsgType`."""
    if not isinstance(value, list):
        return f"must be an array of message elements, got {json_type(value)}"
    for index, element in enumerate(value):
        if not isinstance(element, dict):
            return f"[{index}] must be a message element object, got {json_type(element)}"
        if "MsgType" not in element:
            return f"[{index}].MsgType is missing"
        if not isinstance(element["MsgType"], str):
            return f"[{index}].MsgType must be a string, got {json_type(element['MsgType'])}"
    return None


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    check: FieldCheck
    required: bool = False


def required(name: str, check: FieldCheck = non_empty_string) -> Field:
    return Field(name, check, required=True)


def optional(name: str, check: FieldCheck) -> Field:
    return Field(name, check)


# --- owning entities: the value whose hash picks the partition ---------------------------------------------

EntityRule = Callable[[Mapping[str, Any]], str | None]


class IdentifierTooLong(Exception):
    """An entity or key field over `MAX_ID_BYTES`; `path` names it (`Info.To_Account`). `route` turns it
    into the `InvalidField` answered."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def identifier(body: Mapping[str, Any], field: str, path: str | None = None) -> str | None:
    """`body[field]` when it is a non-empty string, else None; raises `IdentifierTooLong` past the limit."""
    value = body.get(field)
    if not (isinstance(value, str) and value):
        return None
    # A character is at least one UTF-8 byte: only a short string needs encoding to be measured.
    if len(value) > MAX_ID_BYTES or len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise IdentifierTooLong(path or field)
    return value


def account(field: str) -> EntityRule:
    def rule(body: Mapping[str, Any]) -> str | None:
        return identifier(body, field)

    return rule


def account_pair(first: str, second: str) -> EntityRule:
    """A conversation: both accounts sorted by code point and joined with ':' so either side maps alike."""

    def rule(body: Mapping[str, Any]) -> str | None:
        one, other = identifier(body, first), identifier(body, second)
        if one is None or other is None:
            return None
        return ":".join(sorted((one, other)))

    return rule


def nested_account(parent: str, field: str) -> EntityRule:
    def rule(body: Mapping[str, Any]) -> str | None:
        inner = body.get(parent)
        return identifier(inner, field, f"{parent}.{field}") if isinstance(inner, dict) else None

    return rule


def first_pair_account(list_field: str, field: str) -> EntityRule:
    def rule(body: Mapping[str, Any]) -> str | None:
        pairs = body.get(list_field)
        if isinstance(pairs, list) and pairs and isinstance(pairs[0], dict):
            return identifier(pairs[0], field, f"{list_field}[0].{field}")
        return None

    return rule


def app_level(_body: Mapping[str, Any]) -> str | None:
    """App-level events belong to the app; the caller falls back to the SdkAppid."""
    return None


# --- record keys ------------------------------------------------------------------------------------------

KeyRule = Callable[[str, Mapping[str, Any]], str]


def event_key(command: str, body: Mapping[str, Any]) -> str:
    """The key of an event that is not itself a new message: unique to this command.

    `<command>:<MsgKey>` when the body names a message (a withdrawal keeps the message's MsgKey, and must
    not collide with the message itself), else `<command>:sha256:<digest of the body with sorted keys>`,
    which is the same for a retried callback and different for any other event.
    """
    msg_key = identifier(body, "MsgKey")
    if msg_key is not None:
        return f"{command}:{msg_key}"
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return f"{command}:sha256:{hashlib.sha256(canonical).hexdigest()}"


def message_key(command: str, body: Mapping[str, Any]) -> str:
    """A new one-to-one or official-account message: its own `MsgKey`."""
    msg_key = identifier(body, "MsgKey")
    return event_key(command, body) if msg_key is None else msg_key


def group_message_key(command: str, body: Mapping[str, Any]) -> str:
    """A new group message: `<GroupId>:<MsgSeq>`, Tencent's identity of a group message."""
    group_id, msg_seq = identifier(body, "GroupId"), body.get("MsgSeq")
    if group_id is not None and integer(msg_seq) is None:
        return f"{group_id}:{msg_seq}"
    return event_key(command, body)


# --- the registry ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Family:
    """A command family: the word before the first dot of its commands."""

    name: str
    topic_group: TopicGroup
    entity: EntityRule
    """The owning entity of the family's commands the bridge does not know individually."""


@dataclass(frozen=True, slots=True)
class CommandSpec:
    name: str
    family: Family
    entity: EntityRule
    fields: tuple[Field, ...] = ()
    key: KeyRule = event_key


OFFICIAL_ACCOUNT = Family("OfficialAccount", TopicGroup.OFFICIAL_ACCOUNT, account("Official_Account"))
C2C = Family("C2C", TopicGroup.C2C, account_pair("From_Account", "To_Account"))
GROUP = Family("Group", TopicGroup.GROUP, account("GroupId"))
STATE = Family("State", TopicGroup.USER, nested_account("Info", "To_Account"))
PROFILE = Family("Profile", TopicGroup.USER, account("From_Account"))
SNS = Family("Sns", TopicGroup.USER, account("From_Account"))
FOLLOW = Family("Follow", TopicGroup.USER, account("From_Account"))
FAMILIES = {
    family.name: family
    for family in (
        OFFICIAL_ACCOUNT,
        C2C,
        GROUP,
        STATE,
        PROFILE,
        SNS,
        FOLLOW,
        *(Family(name, TopicGroup.APP, app_level) for name in ("Alert", "Push", "ContentCallback", "Bot")),
    )
}
UNKNOWN_FAMILY = Family("", TopicGroup.UNKNOWN, app_level)

EVENT_TIME = optional("EventTime", event_time)
MESSAGE_FIELDS = (
    optional("MsgTime", integer),
    optional("OnlineOnlyFlag", integer),
    optional("MsgBody", msg_body),
    optional("CloudCustomData", string),
    EVENT_TIME,
)


def _official_account(suffix: str, *fields: Field, key: KeyRule = event_key) -> CommandSpec:
    return CommandSpec(
        f"OfficialAccount.{suffix}",
        OFFICIAL_ACCOUNT,
        OFFICIAL_ACCOUNT.entity,
        (required("Official_Account"), *fields),
        key,
    )


def _group(suffix: str, *fields: Field, key: KeyRule = event_key) -> CommandSpec:
    return CommandSpec(f"Group.{suffix}", GROUP, GROUP.entity, (required("GroupId"), *fields), key)


def _user(family: Family, suffix: str, *fields: Field, entity: EntityRule | None = None) -> CommandSpec:
    return CommandSpec(f"{family.name}.{suffix}", family, entity or family.entity, (*fields, EVENT_TIME))


_SUBSCRIBERS = (optional("Operator_Account", string), optional("SubscribeAccountList", array), EVENT_TIME)
_C2C_MESSAGE = (
    required("From_Account"),
    required("To_Account"),
    optional("MsgSeq", integer),
    optional("MsgRandom", integer),
    optional("MsgKey", string),
    *MESSAGE_FIELDS,
)
_GROUP_MESSAGE = (
    optional("Type", string),
    optional("From_Account", string),
    optional("Operator_Account", string),
    optional("Random", integer),
    optional("MsgSeq", integer),
    *MESSAGE_FIELDS,
)
_SNS_PAIRS = (required("PairList", array),)
# Relationship changes come as a list of pairs; they belong to the first pair's From_Account.
_FIRST_PAIR = first_pair_account("PairList", "From_Account")

COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        _official_account("CallbackAfterSendMsg", required("MsgKey"), *MESSAGE_FIELDS, key=message_key),
        _official_account("CallbackBeforeSendMsg", *MESSAGE_FIELDS),
        _official_account("CallbackAfterMsgWithDraw", optional("WithdrawMsgList", array), EVENT_TIME),
        _official_account("CallbackAfterAddSubscriber", *_SUBSCRIBERS),
        _official_account("CallbackBeforeAddSubscriber", *_SUBSCRIBERS),
        _official_account("CallbackAfterDeleteSubscriber", *_SUBSCRIBERS),
        _official_account("CallbackAfterCreateOfficialAccount", EVENT_TIME),
        _official_account("CallbackAfterOfficialAccountInfoChanged", EVENT_TIME),
        _official_account("CallbackAfterOfficialAccountDestroyed", EVENT_TIME),
        _official_account("CallbackAfterOfficialAccountFull", EVENT_TIME),
        CommandSpec(
            "OfficialAccount.CallbackBeforeCreateOfficialAccount",
            OFFICIAL_ACCOUNT,
            account("Owner_Account"),
            (required("Owner_Account"), EVENT_TIME),
        ),
        CommandSpec("C2C.CallbackAfterSendMsg", C2C, C2C.entity, _C2C_MESSAGE, message_key),
        CommandSpec("C2C.CallbackBeforeSendMsg", C2C, C2C.entity, _C2C_MESSAGE),
        CommandSpec(
            "C2C.CallbackAfterMsgWithDraw",
            C2C,
            C2C.entity,
            (required("From_Account"), required("To_Account"), optional("MsgKey", string), EVENT_TIME),
        ),
        CommandSpec(
            "C2C.CallbackAfterMsgReport",
            C2C,
            account_pair("Report_Account", "Peer_Account"),
            (required("Report_Account"), required("Peer_Account"), EVENT_TIME),
        ),
        _group("CallbackAfterSendMsg", *_GROUP_MESSAGE, key=group_message_key),
        _group("CallbackBeforeSendMsg", *_GROUP_MESSAGE),
        _group("CallbackAfterNewMemberJoin", EVENT_TIME),
        _group("CallbackAfterMemberExit", EVENT_TIME),
        _group("CallbackAfterRecallMsg", EVENT_TIME),
        _group("CallbackAfterCreateGroup", EVENT_TIME),
        _group("CallbackAfterGroupDestroyed", EVENT_TIME),
        _group("CallbackAfterGroupInfoChanged", EVENT_TIME),
        CommandSpec(
            "Group.CallbackBeforeCreateGroup",
            GROUP,
            account("Owner_Account"),
            (required("Owner_Account"), EVENT_TIME),
        ),
        CommandSpec("Group.CallbackOnDailyGroupQuotaAlarm", GROUP, app_level, (EVENT_TIME,)),
        _user(STATE, "StateChange", required("Info", json_object), optional("KickedDevice", array)),
        _user(PROFILE, "CallbackPortraitSet", required("From_Account")),
        _user(SNS, "CallbackFriendAdd", *_SNS_PAIRS, entity=_FIRST_PAIR),
        _user(SNS, "CallbackFriendDelete", *_SNS_PAIRS, entity=_FIRST_PAIR),
        _user(SNS, "CallbackBlackListAdd", *_SNS_PAIRS, entity=_FIRST_PAIR),
        _user(SNS, "CallbackBlackListDelete", *_SNS_PAIRS, entity=_FIRST_PAIR),
        _user(SNS, "CallbackPrevFriendAdd", required("From_Account")),
        _user(SNS, "CallbackPrevFriendResponse", required("From_Account")),
        _user(FOLLOW, "CallbackAfterFollowAdd", required("From_Account")),
        _user(FOLLOW, "CallbackAfterFollowDelete", required("From_Account")),
    )
}


@dataclass(slots=True)  # not frozen: see `bridge.tencent.envelope.Record`
class RoutedCallback:
    """Where and how one validated callback goes to Kafka."""

    command: str
    family: str
    topic_group: TopicGroup
    entity: str
    key: str
    event_time_ms: int | None
    known: bool


def route(command: str, sdk_app_id: str, body: Mapping[str, Any]) -> RoutedCallback:
    """Validate a known command's fields and work out its topic group, owning entity, key and event time.

    Raises `InvalidField` naming the first field that is missing or of the wrong JSON type, or, for any
    command, an entity or key field longer than `MAX_ID_BYTES`.
    """
    spec = COMMANDS.get(command)
    if spec is not None:
        VALIDATORS[command](body)
        family, entity_rule, key_rule = spec.family, spec.entity, spec.key
    else:
        family = FAMILIES.get(command.partition(".")[0], UNKNOWN_FAMILY)
        entity_rule, key_rule = family.entity, event_key
    try:
        entity, key = entity_rule(body) or sdk_app_id, key_rule(command, body)
    except IdentifierTooLong as exc:
        raise InvalidField(
            f"{command}: field '{exc.path}' is longer than {MAX_ID_BYTES} bytes, the limit of the fields "
            "that name the owning entity or key a record"
        ) from None
    return RoutedCallback(
        command=command,
        family=family.name or "unknown",
        topic_group=family.topic_group,
        entity=entity,
        key=key,
        event_time_ms=_event_time_ms(body.get("EventTime")),
        known=spec is not None,
    )


Validator = Callable[[Mapping[str, Any]], None]
_MISSING = object()
# The checks whose success is one test of the value's exact type (`type(True) is bool`, not int): the
# compiled validators test that first and call the check only to word what is wrong.
_PASSES_AS: dict[FieldCheck, type] = {
    string: str,
    non_empty_string: str,
    integer: int,
    array: list,
    json_object: dict,
}


def compile_validator(spec: CommandSpec) -> Validator:
    """The validator of `spec`'s fields: raises `InvalidField` naming the first field that is missing or
    of the wrong JSON type, in the order of `spec.fields`, as the field checks word it."""
    plan = tuple(
        (
            field.name,
            field.required,
            field.check,
            _PASSES_AS.get(field.check),
            field.check is non_empty_string,
        )
        for field in spec.fields
    )

    def validate(body: Mapping[str, Any]) -> None:
        for name, is_required, check, passes_as, non_empty in plan:
            value = body.get(name, _MISSING)
            if value is _MISSING:
                if is_required:
                    raise InvalidField(f"{spec.name}: required field '{name}' is missing")
                continue
            if type(value) is passes_as and (value or not non_empty):
                continue
            problem = check(value)
            if problem is not None:
                separator = "" if problem.startswith("[") else " "
                raise InvalidField(f"{spec.name}: field '{name}'{separator}{problem}")

    return validate


VALIDATORS: dict[str, Validator] = {name: compile_validator(spec) for name, spec in COMMANDS.items()}
"""Each known command's validator, compiled once from `COMMANDS`."""


def _event_time_ms(value: Any) -> int | None:
    """EventTime as a Kafka timestamp, if it is a usable one (a non-negative 64-bit millisecond count)."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _INT64_MAX:
        return value
    return None


# --- before-callbacks: Tencent holds the user's action until the answer -------------------------------

_BEFORE_MARKS = (".CallbackBefore", ".CallbackPrev")


def runs_before(command: str) -> bool:
    """Whether Tencent waits for this command's answer before the user's action happens (a message is sent,
    a friend added, a group created): `*.CallbackBefore*` and `Sns.CallbackPrev*`, known to the registry or
    not, so a before-callback Tencent adds tomorrow gets the short deadline too. Two substring tests, no
    allocation: it runs for every callback."""
    return _BEFORE_MARKS[0] in command or _BEFORE_MARKS[1] in command


BEFORE_COMMANDS: tuple[str, ...] = tuple(name for name in COMMANDS if runs_before(name))
"""The registry's before-callbacks, in its order (README, "Before-callbacks")."""
