#!/usr/bin/env python3
"""Writes chat_golden.json: chat requests rendered by Python's Jinja2 set up as transformers'
apply_chat_template sets it up (sandboxed, trim_blocks, lstrip_blocks, loop controls,
raise_exception, a json.dumps tojson), after SGLang's message processing (serving_chat.py's
jinja path). routerd's kv::chat tests render the same cases with minijinja and compare.
    python3 routerd/src/kv/testdata/chat_golden.py   # needs jinja2
"""
import json
import os

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def env():
    e = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[loopcontrols])
    e.filters["tojson"] = tojson
    e.globals["raise_exception"] = raise_exception
    return e


def parts_as_list(template):
    # SGLang's detection, by keyword and by a loop over message content (regex-free here:
    # the cases below are plain).
    if any(k in template for k in ["image", "audio", "video", "vision"]):
        return True
    squashed = template.replace(" ", "")
    return any(f"in{v}{k}" in squashed for v in ["message", "msg", "m"]
               for k in [".content", "['content']", '["content"]'])


MESSAGE_FIELDS = ["role", "content", "tool_call_id", "name", "reasoning_content", "tool_calls",
                  "tools"]


def dump_tool(t):
    f = t["function"]
    fn = {"description": f.get("description"), "name": f["name"],
          "parameters": f.get("parameters"), "strict": f.get("strict", False)}
    return {"type": t.get("type", "function"), "function": fn,
            "defer_loading": t.get("defer_loading")}


def sglang_prompt(template, specials, req):
    as_list = parts_as_list(template)
    messages = []
    for m in req["messages"]:
        m = {k: m.get(k) for k in MESSAGE_FIELDS}
        m["role"] = m["role"].lower()
        if m.get("tools") is not None:
            m["tools"] = [dump_tool(t) for t in m["tools"]]
        if m["content"] is None:
            m["content"] = ""
        if isinstance(m["content"], list):
            texts = [p["text"] for p in m["content"] if p.get("type") == "text"]
            if as_list:
                m["content"] = [{"type": "text", "text": t} for t in texts]
            else:
                m["content"] = " ".join(texts)
        messages.append({k: v for k, v in m.items() if v is not None})
    prefix = None
    if messages and messages[-1]["role"] == "assistant" and isinstance(messages[-1]["content"], str):
        if req.get("continue_final_message"):
            prefix = messages.pop()["content"]
        else:
            messages[-1] = {"role": "user", "content": messages[-1]["content"]}
    tools = req.get("tools")
    choice = req.get("tool_choice")
    if choice is None:
        choice = "none" if tools is None else "auto"
    if not tools or choice == "none":
        tools = None
    elif isinstance(choice, dict):
        tools = [dump_tool(t) for t in tools if t["function"]["name"] == choice["function"]["name"]]
    else:
        tools = [dump_tool(t) for t in tools]
    kwargs = dict(specials)
    if req.get("reasoning_effort") is not None:
        kwargs["reasoning_effort"] = req["reasoning_effort"]
    kwargs.update(req.get("chat_template_kwargs") or {})
    try:
        text = env().from_string(template).render(messages=messages, tools=tools, documents=None,
                                                  add_generation_prompt=True, **kwargs)
    except jinja2.exceptions.TemplateError as e:
        return {"error": str(e)}
    return {"prompt": text + (prefix or "")}


CHATML = open(os.path.join(HERE, "..", "chatml.jinja")).read()

# A Llama 3.1-like template: BOS, a system block with a fixed date, tools as indented JSON in
# the first user message, `.strip()`-style Python methods, loop controls.
LLAMA = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'skip' %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'].strip() | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Content parts as a list (SGLang's "openai" format), role alternation enforced with
# raise_exception, a namespace, `loop.last`, dict `.items()`.
PARTS = """{%- set ns = namespace(n=0) %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (ns.n % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set ns.n = ns.n + 1 %}
    {{- '[' + message['role'] + ']' }}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'text' %}{{ content['text'] }}{% if not loop.last %} | {% endif %}{% endif %}
    {%- endfor %}
    {{- eos_token + '\\n' }}
{%- endfor %}
{%- for k, v in (extra or {}).items() %}{{ k }}={{ v }};{% endfor %}
{%- if add_generation_prompt %}[assistant]{% endif %}"""

SPECIALS_LLAMA = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
SPECIALS_CHATML = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
SPECIALS_PARTS = {"eos_token": "</s>", "bos_token": "<s>"}

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                          "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time",
        "parameters": {"type": "object", "properties": {}}}}

CASES = [
    ("chatml plain", CHATML, SPECIALS_CHATML,
     {"messages": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Hi \u00e9t\u00e9"}]}),
    ("chatml multi-turn, parts joined, null content", CHATML, SPECIALS_CHATML,
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "text", "text": "b"}]},
                   {"role": "assistant", "content": None, "name": None},
                   {"role": "User", "content": "again"}]}),
    ("chatml last assistant becomes user", CHATML, SPECIALS_CHATML,
     {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "half"}]}),
    ("chatml continue_final_message", CHATML, SPECIALS_CHATML,
     {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "half"}],
      "continue_final_message": True}),
    ("chatml tools", CHATML, SPECIALS_CHATML,
     {"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER, TIME]}),
    ("chatml tool_choice none", CHATML, SPECIALS_CHATML,
     {"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER],
      "tool_choice": "none"}),
    ("chatml named tool", CHATML, SPECIALS_CHATML,
     {"messages": [{"role": "user", "content": "time?"}], "tools": [WEATHER, TIME],
      "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
    ("llama system and tools", LLAMA, SPECIALS_LLAMA,
     {"messages": [{"role": "system", "content": "  You help.  "},
                   {"role": "user", "content": "  weather in Paris?  "}],
      "tools": [WEATHER]}),
    ("llama date from chat_template_kwargs", LLAMA, SPECIALS_LLAMA,
     {"messages": [{"role": "user", "content": "hello"}],
      "chat_template_kwargs": {"date_string": "02 Dec 2026"}}),
    ("parts kept as a list", PARTS, SPECIALS_PARTS,
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                 {"type": "text", "text": "y"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "z"}]},
                   {"role": "user", "content": [{"type": "text", "text": "w"}]}],
      "chat_template_kwargs": {"extra": {"k": 1, "b": "two"}}}),
    ("raise_exception refuses", PARTS, SPECIALS_PARTS,
     {"messages": [{"role": "assistant", "content": [{"type": "text", "text": "z"}]},
                   {"role": "user", "content": [{"type": "text", "text": "w"}]}]}),
]

out = []
for name, template, specials, req in CASES:
    out.append({"name": name, "template": template, "specials": specials, "request": req,
                **sglang_prompt(template, specials, req)})
with open(os.path.join(HERE, "chat_golden.json"), "w") as f:
    json.dump(out, f, indent=1, ensure_ascii=False)
    f.write("\n")
print(f"wrote {len(out)} cases")
