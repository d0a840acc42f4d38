"""Function tools: Python functions on the worker that agent steps can call, beside the sandbox tools.

    async def lookup_customer(customer_id: Annotated[str, Field(description="e.g. C-1042")]) -> dict[str, str]:
        '''The customer's name and tier, from the CRM.'''
        ...

    TardigradePlugin(tools=[lookup_customer])                # or function_tool(lookup_customer, timeout=10)

and in the pipeline file ``tools: [read_file, write_file, lookup_customer]``. The JSON schema the model is shown
comes from the type hints (through pydantic, like the Agents SDK's ``function_tool``), the description from the
docstring. A call runs as its own activity on a worker of the pipeline's task queue - outside the sandbox, so the
function can use the worker's credentials without the sandbox ever holding them - with its own timeout and
retries; the result (text, or JSON of what it returns) goes into the conversation store like a sandbox tool's.

Every worker of a task queue that runs agent steps naming a function tool must register it. Nothing here imports
temporalio: the registry is plain data the activities use.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic_core import to_json

from tardigrade.agent_spec import TOOL_ARGS, TOOL_NAME_PATTERN, without_titles

#: The names the sandbox's own tools and `finish` use; a function tool may not take one of them.
RESERVED_TOOL_NAMES = frozenset({*TOOL_ARGS})
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_ATTEMPTS = 3


class FunctionToolError(ValueError):
    """A function cannot be made into a tool, or a registry is inconsistent."""


class _Args(BaseModel):
    # Models sometimes add keys of their own; ignoring them beats failing the call (as for the sandbox tools).
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=False)


@dataclass(frozen=True)
class FunctionTool:
    """A registered function: its name and description for the model, its argument model, and how it is run."""

    name: str
    description: str
    function: Callable[..., Any]
    arguments: type[BaseModel]
    timeout: float = DEFAULT_TIMEOUT  # seconds for one attempt (the activity's start-to-close timeout)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # attempts before the error goes back to the model as the result

    def schema(self) -> dict[str, Any]:
        """The tool as the model is shown it: name, description and JSON schema (titles dropped)."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": without_titles(self.arguments.model_json_schema()),
        }

    def check(self, arguments: Mapping[str, Any]) -> BaseModel:
        """Validate what the model sent; raises ValueError with one line per problem."""
        try:
            return self.arguments.model_validate(dict(arguments))
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}" for err in e.errors()
            )
            raise ValueError(problems) from None

    async def call(self, arguments: BaseModel) -> str:
        """Run the function with checked arguments; a string result is returned as is, anything else as JSON."""
        kwargs = {name: getattr(arguments, name) for name in type(arguments).model_fields}
        if inspect.iscoroutinefunction(self.function):
            result = await self.function(**kwargs)
        else:
            # A thread keeps a blocking function off the event loop. If the attempt times out the thread runs
            # on to its end: Python cannot stop it; the result is then ignored.
            result = await asyncio.to_thread(self.function, **kwargs)
        return result if isinstance(result, str) else to_json(result, fallback=str).decode()


def function_tool(
    function: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> FunctionTool:
    """Make ``function`` a tool. Every parameter needs a type hint (pydantic turns them into the JSON schema);
    ``Annotated[T, Field(description=...)]`` describes a parameter to the model."""
    tool_name: str = name or str(getattr(function, "__name__", ""))
    where = f"function tool {tool_name or function!r}"
    if not re.match(TOOL_NAME_PATTERN, tool_name):
        raise FunctionToolError(f"{where}: a tool name is 1-64 letters, digits, _ or -, starting with a letter or _")
    if tool_name in RESERVED_TOOL_NAMES:
        raise FunctionToolError(f"{where}: {tool_name!r} is a built-in tool's name; pass name=... to rename it")
    if not callable(function):
        raise FunctionToolError(f"{where}: not callable")
    if timeout <= 0 or max_attempts < 1:
        raise FunctionToolError(f"{where}: timeout must be > 0 and max_attempts >= 1")
    return FunctionTool(
        name=tool_name,
        description=(description or inspect.getdoc(function) or "").strip(),
        function=function,
        arguments=_argument_model(function, tool_name, where),
        timeout=float(timeout),
        max_attempts=max_attempts,
    )


def function_tools(tools: Iterable[Callable[..., Any] | FunctionTool]) -> dict[str, FunctionTool]:
    """The registry a plugin holds: functions made into tools (with defaults), by name; names must be distinct."""
    registry: dict[str, FunctionTool] = {}
    for tool in tools:
        made = tool if isinstance(tool, FunctionTool) else function_tool(tool)
        if made.name in registry:
            raise FunctionToolError(f"two function tools are named {made.name!r}; pass name=... to one of them")
        registry[made.name] = made
    return registry


def _argument_model(function: Callable[..., Any], name: str, where: str) -> type[BaseModel]:
    try:
        signature = inspect.signature(function)
        hints = get_type_hints(function, include_extras=True)
    except (TypeError, ValueError, NameError) as e:
        raise FunctionToolError(f"{where}: cannot read its signature ({e})") from None
    fields: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD, parameter.POSITIONAL_ONLY):
            raise FunctionToolError(f"{where}: parameter {parameter.name!r} must be an ordinary named parameter")
        if parameter.name not in hints:
            raise FunctionToolError(f"{where}: parameter {parameter.name!r} needs a type hint (it becomes the schema)")
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (hints[parameter.name], default)
    try:
        model = create_model(f"{name}_arguments", __base__=_Args, **fields)
        model.model_json_schema()  # a type pydantic cannot describe fails here, at registration
    except Exception as e:  # pydantic raises several kinds; all mean the same to the user
        raise FunctionToolError(f"{where}: its parameters cannot be described as JSON schema ({e})") from None
    return model
