"""Tool calling: `tools` / `tool_choice` / `parallel_tool_calls` -> how the prompt is rendered, what the output is
constrained to, and how the output becomes `message.tool_calls` (or `tool_calls` stream deltas).

- `none` (or no tools): plain chat; the tools are not rendered.
- `auto`: the tools are rendered into the prompt; the output is parsed with the served family's format
  (Qwen/Hermes `<tool_call>{...}</tool_call>`, Llama 3.x JSON `{"name", "parameters"}`, Mistral
  `[TOOL_CALLS][...]`); calls found -> `tool_calls` and finish_reason "tool_calls", else plain content.
- `required`: the output is constrained (grammar) to a JSON array of calls whose arguments follow each function's
  JSON Schema (one call when parallel_tool_calls is false).
- a named function: the output is constrained to that function's arguments object.

A model whose chat template knows no tools (SmolLM2, the tiny test model) gets them described in the system
message in the Hermes format, and earlier assistant tool calls written back in that format, so every model can
run a tool loop.
"""
from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from replicas.engine.protocol import StructuredOutput
from router.errors import bad_request
from router.structured import json_schema_output

FORMATS = ("hermes", "llama3_json", "mistral")
_ALNUM = string.ascii_letters + string.digits


def call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def detect_format(tokenizer) -> str:
    """The tool-call format of the served family, from its chat template and vocabulary."""
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    if "[TOOL_CALLS]" in template or "[TOOL_CALLS]" in vocab:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=call_id)


def _call(obj: Any) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list[Any] | None:
    """Consecutive JSON values in `text` (separated by whitespace or ';'); None if anything else is there."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse(fmt: str, text: str) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a complete output; no calls -> (text, [])."""
    if fmt == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for body in _HERMES.findall(text[start:]):
            values = _json_values(body)
            if not values or len(values) != 1 or (c := _call(values[0])) is None:
                return text, []
            calls.append(c)
        return text[:start].strip() or None, calls
    if fmt == "mistral":
        start = text.find("[TOOL_CALLS]")
        head, body = (text[:start], text[start + len("[TOOL_CALLS]"):]) if start >= 0 else ("", text)
        values = _json_values(body)
        if not values:
            return text, []
        items = [v for value in values for v in (value if isinstance(value, list) else [value])]
        calls = [_call(v) for v in items]
        if not calls or any(c is None for c in calls):
            return text, []
        return head.strip() or None, calls
    # llama3_json: the whole output is one or more {"name", "parameters"} objects (after <|python_tag|>)
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):]
    values = _json_values(body) if body.startswith("{") else None
    calls = [_call(v) for v in values or []]
    if not calls or any(c is None for c in calls):
        return text, []
    return None, calls


def may_start_call(fmt: str, text: str) -> int:
    """Where in `text` a tool call may begin (so streamed content must stop there); len(text) when nowhere."""
    if fmt == "llama3_json":
        stripped = text.lstrip()
        if not stripped:
            return 0
        return 0 if stripped[0] in "{<" else len(text)
    marker = "<tool_call>" if fmt == "hermes" else "[TOOL_CALLS]"
    if fmt == "mistral" and text.lstrip()[:1] == "[":
        return 0
    i = text.find(marker)
    if i >= 0:
        return i
    for k in range(min(len(marker) - 1, len(text)), 0, -1):  # a marker's beginning at the very end
        if marker.startswith(text[-k:]):
            return len(text) - k
    return len(text)


# ------------------------------------------------------------------ the request's tool mode


@dataclass
class ToolMode:
    """What a chat request's tools ask of the response."""
    choice: str  # "auto" | "required" | "named"
    fmt: str
    parallel: bool
    name: str | None = None  # the named function

    def finish(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of one choice's complete output."""
        if self.choice == "named":
            return None, [ParsedCall(self.name, _compact(text))]
        if self.choice == "required":
            try:
                values = json.loads(text)
            except ValueError:  # cut by max_tokens: nothing callable
                return text, []
            calls = [c for c in (_call(v) for v in values) if c is not None]
        else:
            content, calls = parse(self.fmt, text)
            if calls:
                return content, calls if self.parallel else calls[:1]
            return content, []
        return None, calls if self.parallel else calls[:1]


def _compact(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:  # cut by max_tokens: pass on what there is
        return text


def tool_mode(body, fmt: str) -> tuple[ToolMode | None, StructuredOutput | None]:
    """The ToolMode of a chat request (None: no tools in play) and the grammar its output needs."""
    tools = body.tools or []
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice != "none":
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None, None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct function names", param="tools")
    params = {}
    for i, t in enumerate(tools):
        schema = t.function.parameters if t.function.parameters is not None else {"type": "object", "properties": {}}
        json_schema_output(schema, f"tools[{i}].function.parameters")  # features the grammar cannot enforce: 400
        params[t.function.name] = schema
    parallel = body.parallel_tool_calls is not False
    if choice == "none":
        return None, None
    if choice == "auto":
        return ToolMode("auto", fmt, parallel), None
    if choice == "required":
        item = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": s},
                           "required": ["name", "arguments"], "additionalProperties": False}
                          for n, s in params.items()]}
        array = {"type": "array", "items": item, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return ToolMode("required", fmt, parallel), StructuredOutput(kind="json_schema",
                                                                    json_schema=json.dumps(array, sort_keys=True))
    name = choice.function.name
    if name not in params:
        raise bad_request(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
    return ToolMode("named", fmt, parallel, name), StructuredOutput(
        kind="json_schema", json_schema=json.dumps(params[name], sort_keys=True))


# ------------------------------------------------------------------ the prompt


def template_messages(body, tokenizer, render_tools: bool) -> tuple[list[dict], dict]:
    """Messages for the chat template, and extra template arguments (`tools` for templates that know them)."""
    knows_tools = "tools" in (tokenizer.chat_template or "")
    msgs = []
    for m in body.messages:
        d = m.template_dict()
        if m.role == "assistant" and m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _loads(c.function.arguments)} for c in m.tool_calls]
            if knows_tools:
                d["tool_calls"] = [{"id": c.id, "type": "function", "function": call}
                                   for c, call in zip(m.tool_calls, calls)]
            else:
                text = "\n".join(f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>" for call in calls)
                d["content"] = (d["content"] + "\n" if d["content"] else "") + text
        elif m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
            if not knows_tools:
                d["content"] = f"<tool_response>\n{d['content']}\n</tool_response>"
        msgs.append(d)
    if not render_tools or not body.tools:
        return msgs, {}
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    if knows_tools:
        return msgs, {"tools": tools}
    prompt = ("You may call one or more functions to assist with the user query. Function signatures are "
              "within <tools></tools>:\n<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) +
              "\n</tools>\nFor each function call, return a JSON object with the function name and arguments "
              "within <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call>")
    if msgs and msgs[0]["role"] == "system":
        msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + prompt}
    else:
        msgs.insert(0, {"role": "system", "content": prompt})
    return msgs, {}


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
