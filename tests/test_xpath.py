"""Workflow XPath: the step-form rewrite, compile_check, and every evq* function with evQueue's context rules."""

from __future__ import annotations

import pytest
from lxml import etree

from jobd.engine.xpath import (
    EvalContext,
    WaitRequested,
    XPathError,
    compile_check,
    evaluate,
    evaluate_boolean,
    evaluate_nodes,
    evaluate_string,
    evaluate_strings,
    expand_braces,
    rewrite,
    string_value,
)

# An instance as the machine leaves it after list.sh ran and the loop over its files started (reference §2.7).
INSTANCE = b"""\
<workflow name="loopdemo" evqid="1" status="EXECUTING">
  <parameters><parameter name="count">3</parameter><parameter name="h">example.org</parameter></parameters>
  <subjobs>
    <job name="list" evqid="2" context-id="1">
      <tasks>
        <task name="list" path="list.sh" evqid="3" context-id="1" status="TERMINATED" retval="0">
          <input name="n" mode="text">3</input>
          <output method="xml" retval="0"><files>
            <file name="f1.txt" size="10" evqid="5"/><file name="f2.txt" size="20" evqid="6"/>
            <file name="f3.txt" size="30" evqid="9"/>
          </files></output>
        </task>
        <task name="other" path="other.sh" evqid="12" context-id="1" status="TERMINATED" retval="0">
          <input name="n" mode="text">from other</input>
          <output method="text" retval="0">other output</output>
        </task>
      </tasks>
      <subjobs>
        <job name="process" evqid="7" context-id="6">
          <tasks><task name="show" path="show.sh" evqid="8" context-id="6" status="QUEUED"/></tasks>
          <subjobs>
            <job name="deep" evqid="10" context-id="7">
              <tasks><task name="leaf" path="leaf.sh" evqid="11" context-id="7"/></tasks>
            </job>
          </subjobs>
        </job>
      </subjobs>
    </job>
  </subjobs>
</workflow>
"""


@pytest.fixture()
def root() -> etree._Element:
    return etree.fromstring(INSTANCE)


def node(root: etree._Element, evqid: int) -> etree._Element:
    found = root.xpath(f"//*[@evqid='{evqid}']")
    assert isinstance(found, list)
    element = found[0]
    assert isinstance(element, etree._Element)
    return element


def names(result: object) -> list[str | None]:
    assert isinstance(result, list)
    return [item.get("name") for item in result]


# ------------------------------------------------------------------------------------------------------ rewrite


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        (
            "evqGetParentJob()/evqGetOutput('list')/files/file",
            "evq-step:evqGetOutput(evqGetParentJob(), 'list')/files/file",
        ),
        (
            "evqGetParentJob()/evqGetParentJob()/evqGetOutput('x')",
            "evq-step:evqGetOutput(evq-step:evqGetParentJob(evqGetParentJob()), 'x')",
        ),
        # a literal holding '/', '(' or a step-looking text is not touched
        ("evqGetOutput('a/evqGetOutput(b)')", "evqGetOutput('a/evqGetOutput(b)')"),
        ('evqGetCurrentJob()/evqGetOutput("a(b")[1]/x', 'evq-step:evqGetOutput(evqGetCurrentJob(), "a(b")[1]/x'),
        # predicates and parentheses belong to the left operand
        ("//job[@name='a/b']/evqGetOutput('t')", "evq-step:evqGetOutput(//job[@name='a/b'], 't')"),
        ("(a | b)/evqGetContext()", "evq-step:evqGetContext((a | b))"),
        # `//` before the step keeps its meaning; a leading step gets the root as its left context
        ("subjobs//evqGetOutput('t')", "evq-step:evqGetOutput(subjobs/descendant-or-self::node(), 't')"),
        ("/evqGetContext()", "evq-step:evqGetContext(/)"),
        ("//evqGetOutput('t')", "evq-step:evqGetOutput(/descendant-or-self::node(), 't')"),
        # `.` and `..` are steps like any other (they were taken for nothing: `.evq-step:…(/)`, refused)
        ("./evqGetOutput('list')/files/file", "evq-step:evqGetOutput(., 'list')/files/file"),
        ("../evqGetParentJob()", "evq-step:evqGetParentJob(..)"),
        ("x/../evqGetOutput('a')", "evq-step:evqGetOutput(x/.., 'a')"),
        # operators end the left operand: a path binds tighter than them
        ("x div evqGetParentJob()/evqGetOutput('a')", "x div evq-step:evqGetOutput(evqGetParentJob(), 'a')"),
        ("2 * j/evqGetOutput('a')", "2 * evq-step:evqGetOutput(j, 'a')"),
        ("a | b/evqGetOutput('a')", "a | evq-step:evqGetOutput(b, 'a')"),
        ("*/evqGetOutput('a')", "evq-step:evqGetOutput(*, 'a')"),
        # nested inside arguments and predicates
        (
            "count(evqGetParentJob()/evqGetOutput('l')/files/file[@size > 10])",
            "count(evq-step:evqGetOutput(evqGetParentJob(), 'l')/files/file[@size > 10])",
        ),
        (
            "a[evqGetCurrentJob()/evqGetOutput('q') = 'x']/b",
            "a[evq-step:evqGetOutput(evqGetCurrentJob(), 'q') = 'x']/b",
        ),
        (
            "evqGetOutput(string(evqGetParentJob()/evqGetInput('t', 'i')))",
            "evqGetOutput(string(evq-step:evqGetInput(evqGetParentJob(), 't', 'i')))",
        ),
        # no step form: unchanged
        ("@size > 10", "@size > 10"),
        ("evqGetOutput('list')/files/file", "evqGetOutput('list')/files/file"),
        ("child::and/or", "child::and/or"),
    ],
)
def test_rewrite(expression: str, expected: str) -> None:
    assert rewrite(expression) == expected
    compile_check(expression)


# ------------------------------------------------------------------------------------------------ compile_check


@pytest.mark.parametrize(
    "expression",
    [
        "@size > 10",
        "concat(@name, '-', string(@size))",
        "starts-with(normalize-space(.), 'x') and number(@size) >= sum(../file/@size) div 3",
        "evqGetParentJob()/evqGetOutput('list')/files/file",
        "evqGetParentJob(1)/evqGetParentJob('a')",
        "evqWait(count(evqGetParentJob()/tasks/task[@status = 'TERMINATED']) = 2)",
        "text() | comment() | node() | processing-instruction()",
        "file/text() | a//node() | //comment() | /processing-instruction()",  # node tests are steps
        "name(file) = 'x' and file[name() = 'y'] and name(/*)",  # what a function step is told to be written as
        "string-join(file/@name, ',') != '' and min(file/@size) < max(file/@size)",
        "current()/@name",
        "/",  # the root
        "/ | a and count(/) = 1 and (/) = a[/]",  # the root, alone, before an operator or a closing bracket
        "file[position() = 1] | file[last()] | file[position() = last() - 1]",  # not steps: in predicates
        "-1 + - @size * -(2)",  # `-` is also a sign
        # XPath 1.0's functions at the ends of their numbers of arguments
        "concat('a', 'b') = concat('a', 'b', 'c', 'd', 'e')",
        "substring('abc', 2) = substring('abc', 2, 1) and string-length() > string-length('x')",
        "name() = name(a) and normalize-space() != normalize-space(' a ') and number() = number('1')",
        "translate(., 'ab', 'AB') and true() and not(false()) and round(sum(a)) = floor(ceiling(1))",
        "a[@x = 1] | b[. != 'y'] or 2 div 2 mod 1 > 0",
    ],
)
def test_compile_check_accepts(expression: str) -> None:
    compile_check(expression)


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("", "empty"),
        ("a[", "unbalanced '['"),
        ("a)", "unbalanced ')'"),
        ("'abc", "unterminated string literal"),
        ("a ! b", "unexpected character '!'"),
        ("foo(1)", "unknown function foo()"),
        ("evqGetOutput()", "evqGetOutput() takes 1 argument(s), 0 given"),
        ("evqGetParentJob(1, 2)", "evqGetParentJob() takes 0 to 1 argument(s), 2 given"),
        ("evqGetInput('a')", "evqGetInput() takes 2 argument(s), 1 given"),
        # XPath 1.0's own functions: libxml2 compiles these and refuses them at every evaluation, so the node
        # would be ABORTED at each run ("Invalid number of arguments")
        ("count() > 0", "count() takes 1 argument(s), 0 given"),
        ("not(@a, @b)", "not() takes 1 argument(s), 2 given"),
        ("substring('abc')", "substring() takes 2 to 3 argument(s), 1 given"),
        ("concat('a')", "concat() takes 2 or more argument(s), 1 given"),
        ("translate(., 'a')", "translate() takes 3 argument(s), 2 given"),
        ("true(1)", "true() takes 0 argument(s), 1 given"),
        ("string-length(a, b)", "string-length() takes 0 to 1 argument(s), 2 given"),
        ("a/", "the path ends with '/' at character 2: a step must follow"),
        ("a//", "the path ends with '//' at character 2"),
        ("@size >", "the operator '>' at character 7 has nothing after it"),
        ("count(/a) + ", "the operator '+' at character 11 has nothing after it"),
        ("(1 + ) * 2", "the operator '+' at character 4 has nothing after it"),
        ("concat(1 =, 2)", "the operator '=' at character 10 has nothing after it"),
        ("= 1", "the operator '=' at character 1 has nothing before it"),
        ("1 * + 2", "the operator '+' at character 5 has nothing before it"),
        ("a[and 1]", "Invalid predicate"),  # `and` after `[` is a name (XPath's lexical rules): libxml2's word
        # Loaded, then ABORTED at each run ("Undefined variable"): nothing defines one.
        ("$var", "variable $var is not defined"),
        ("@x = $x", "variable $x is not defined"),
        # The same for a namespace prefix ("Undefined namespace prefix"): nothing declares one.
        ("evqGetOutput('ns')/x:r", "namespace prefix 'x' at character 20 is not defined"),
        ("count(child::x:r/@n)", "(select such elements with *[local-name() = 'r'])"),
        ("a/x:*", "namespace prefix 'x' at character 3 is not defined"),
        ("@x:n = 1", "namespace prefix 'x' at character 2"),
        # Defined in custom attributes and automatic tags only (summary=True): elsewhere ABORTED at each run.
        ("count(evqGetJob('list')) = 1", "evqGetJob() at character 7 is only available in custom-attributes"),
        ("evqGetParentJob()/evqGetJob('a')", "evqGetJob() at character 19 is only available"),
        # evQueue's dialect took a function as a step (XPath 2 style); libxml2 said only "Invalid expression".
        (
            "file/name()",
            "name() at character 6 is a path step (file/name()), which XPath 1.0 does not allow: write name(file) "
            "for the name of its first node, or file[name() = '…'] for the nodes whose name is '…' (evQueue's "
            "file/name() was the name of each node)",
        ),
        (
            "count(evqGetOutput('l')/f[1]/local-name())",
            "local-name() at character 30 is a path step (evqGetOutput('l')/f[1]/local-name()), which XPath 1.0 "
            "does not allow: write local-name(evqGetOutput('l')/f[1]) for the local-name of its first node",
        ),
        ("a//string()", "write string(a//node()) for the string of its first node, or a//node()[string() = '…']"),
        ("/name()", "write name(/) for the name of its first node (evQueue's /name() was the name of each node)"),
        (
            "file/position() = 2",
            "position() at character 6 is a path step (file/position()), which XPath 1.0 does not allow: write "
            "count(file) for how many nodes file selects, or file[position() = 2] for the second of them (evQueue's "
            "file/position() was 1, 2, … for its nodes)",
        ),
        (
            "f[x/last() > 1]",
            "last() at character 5 is a path step (x/last()), which XPath 1.0 does not allow: write count(x) for "
            "how many nodes x selects, or x[last()] for the last of them (evQueue's x/last() was that number",
        ),
        ("file/count(x)", "count() at character 6 is a path step (file/count(x)), which XPath 1.0 does not allow: "),
        ("file/count(x)", "write count(file) for how many nodes file selects"),
        ("/position()", "call position() outside the path"),
        ("file/name(.)", "call name() outside the path"),
        # no predicate after `.` or `..` in XPath 1.0: no `.[name() = '…']` offered
        (
            "./name()",
            "is a path step (./name()), which XPath 1.0 does not allow: write name(.) for the name of its "
            "first node (evQueue's",
        ),
        ("../last()", "write count(..) for how many nodes .. selects (evQueue's"),
        # a `/` followed by no step: libxml2 said "Invalid expression"
        ("a/(b)", "'(' at character 3 cannot follow '/': a path step is a name, *, @name, axis::name, a node "),
        ("a//'s'", "\"'s'\" at character 4 cannot follow '//'"),
        ("a/1 + 2", "'1' at character 3 cannot follow '/'"),
        ("a/[1]", "'[' at character 3 cannot follow '/'"),
        ("a/ | b", "'|' at character 4 cannot follow '/'"),
        ("// = 1", "'=' at character 4 cannot follow '//'"),
    ],
)
def test_compile_check_rejects(expression: str, reason: str) -> None:
    with pytest.raises(ValueError, match="invalid XPath expression") as raised:
        compile_check(expression)
    assert reason in str(raised.value)


def test_compile_check_accepts_evqgetjob_where_it_is_defined() -> None:
    """A custom attribute's select and an automatic tag's condition (summary=True) may use evqGetJob()."""
    compile_check("count(evqGetJob('list')/tasks/task/output/files/file)", summary=True)
    compile_check("evqGetParentJob()/evqGetJob('a')", summary=True)


# -------------------------------------------------------------------------------------------- the evq functions


def test_workflow_parameter(root: etree._Element) -> None:
    context = EvalContext.for_node(node(root, 8), root)
    assert evaluate("evqGetWorkflowParameter('count')", root, context) == "3"
    assert evaluate("evqGetWorkflowParameter('missing')", root, context) == ""
    assert evaluate_boolean("evqGetWorkflowParameter('count') + 1 = 4", root, context)


def test_current_job_of_a_task_and_of_a_job(root: etree._Element) -> None:
    assert names(evaluate("evqGetCurrentJob()", root, EvalContext.for_node(node(root, 8), root))) == ["process"]
    assert names(evaluate("evqGetCurrentJob()", root, EvalContext.for_node(node(root, 7), root))) == ["process"]
    # with a left context: the job each node belongs to
    deep = EvalContext.for_node(node(root, 11), root)
    assert names(evaluate("//task[@name='leaf' or @name='list']/evqGetCurrentJob()", root, deep)) == ["list", "deep"]


def test_parent_job_rules(root: etree._Element) -> None:
    leaf = EvalContext.for_node(node(root, 11), root)  # a task of job deep, under process, under list
    assert names(evaluate("evqGetParentJob()", root, leaf)) == ["process"]
    assert names(evaluate("evqGetParentJob(0)", root, leaf)) == ["process"]
    assert names(evaluate("evqGetParentJob(1)", root, leaf)) == ["list"]
    assert names(evaluate("evqGetParentJob(2)", root, leaf)) == ["loopdemo"]  # the <workflow> root
    assert names(evaluate("evqGetParentJob('list')", root, leaf)) == ["list"]
    assert names(evaluate("evqGetParentJob('process')", root, leaf)) == ["process"]
    with pytest.raises(XPathError, match="not enough parents"):
        evaluate("evqGetParentJob(3)", root, leaf)
    with pytest.raises(XPathError, match="could not find job 'nope'"):
        evaluate("evqGetParentJob('nope')", root, leaf)
    # An infinite count (1 div 0, or a number of 400 digits from a launch parameter) is an error of the expression,
    # not an OverflowError that left the instance stuck, and then its resumption stopped jobd's start-up.
    for infinite in ("1 div 0", "-1 div 0", "number('1" + "0" * 400 + "')"):
        with pytest.raises(XPathError, match="is not a number of jobs to climb"):
            evaluate(f"evqGetParentJob({infinite})", root, leaf)
    with pytest.raises(XPathError):
        evaluate("evqGetParentJob(0 div 0)", root, leaf)
    # a top-level job's parent is the workflow root; a job decides with its own parent, not itself
    assert names(evaluate("evqGetParentJob()", root, EvalContext.for_node(node(root, 2), root))) == ["loopdemo"]
    assert names(evaluate("evqGetParentJob()", root, EvalContext.for_node(node(root, 7), root))) == ["list"]
    # step form: climbs from the left node instead
    assert names(evaluate("evqGetParentJob()/evqGetParentJob()", root, leaf)) == ["list"]


def test_get_output_alone_and_as_a_step(root: etree._Element) -> None:
    process = EvalContext.for_node(node(root, 7), root)
    job = node(root, 2)  # the loop of job process is evaluated on its parent job
    files = evaluate("evqGetParentJob()/evqGetOutput('list')/files/file", job, process)
    assert names(files) == ["f1.txt", "f2.txt", "f3.txt"]
    # alone: the parent job's tasks; by name or by path
    assert names(evaluate("evqGetOutput('list')/files/file", job, process)) == ["f1.txt", "f2.txt", "f3.txt"]
    assert evaluate_string("evqGetOutput('other.sh')", job, process) == "other output"
    assert evaluate("evqGetOutput('nothing')", job, process) == []
    assert evaluate_boolean("count(evqGetOutput('list')/files/file[@size > 10]) = 2", job, process)


def test_evq_functions_as_steps_after_dot_and_dotdot(root: etree._Element) -> None:
    process = EvalContext.for_node(node(root, 7), root)
    files = ["f1.txt", "f2.txt", "f3.txt"]
    assert names(evaluate("./evqGetOutput('list')/files/file", node(root, 2), process)) == files
    assert names(evaluate("../../evqGetOutput('list')/files/file", node(root, 3), process)) == files
    assert names(evaluate("../evqGetParentJob()", node(root, 8), process)) == ["list"]


def test_get_input_matches_the_path_only(root: etree._Element) -> None:
    process = EvalContext.for_node(node(root, 8), root)
    assert evaluate_string("evqGetInput('other.sh', 'n')", root, process) == "from other"
    assert evaluate("evqGetInput('other', 'n')", root, process) == []  # evQueue matches @path, never @name
    assert evaluate_string("evqGetParentJob()/evqGetInput('list.sh', 'n')", root, process) == "3"


def test_get_context(root: etree._Element) -> None:
    leaf = EvalContext.for_node(node(root, 11), root)
    # alone: the context of the parent job (process was launched on file f2)
    assert names(evaluate("evqGetContext()", root, leaf)) == ["f2.txt"]
    # as a step: the context of the left node (deep was launched on job process)
    assert names(evaluate("evqGetCurrentJob()/evqGetContext()", root, leaf)) == ["process"]
    assert evaluate_string("evqGetContext()/@size", root, leaf) == "20"


def test_steps_after_text_attribute_and_comment_nodes_use_only_the_elements(root: etree._Element) -> None:
    """lxml hands text and attribute nodes to the functions as strings: they crashed the instance (AttributeError)."""
    leaf = EvalContext.for_node(node(root, 11), root)
    root.append(etree.Comment("a comment"))
    # `//` reaches every text node too; the elements among them give what they give alone
    assert evaluate("count(//evqGetOutput('list'))", root, leaf) == 1.0
    assert evaluate("count(evqGetParentJob()//evqGetInput('list.sh', 'n'))", root, leaf) == 0.0
    assert evaluate("count(evqGetParentJob(2)//evqGetInput('list.sh', 'n'))", root, leaf) == 1.0
    assert names(evaluate("//job[@name='deep']//evqGetContext()", root, leaf)) == ["process"]
    for nothing in (
        "/workflow/@name/evqGetParentJob()",
        "//text()/evqGetContext()",
        "//@name/evqGetCurrentJob()",
        "//comment()/evqGetOutput('list')",
        "//text()/evqGetInput('list.sh', 'n')",
    ):
        assert evaluate(nothing, root, leaf) == [], nothing


def test_get_job_only_in_summaries(root: etree._Element) -> None:
    summary = EvalContext.for_summary(root)
    assert names(evaluate("evqGetJob('process')", root, summary)) == ["process"]
    assert evaluate("count(evqGetJob('list')/tasks/task/output/files/file)", root, summary) == 3.0
    with pytest.raises(XPathError, match="only available in custom-attributes and automatic-tags"):
        evaluate("evqGetJob('list')", root, EvalContext.for_node(node(root, 8), root))


def test_get_job_finds_the_instances_jobs_not_those_an_output_or_input_holds(root: etree._Element) -> None:
    """evQueue looks among the instance's jobs (//subjobs/job); a `<job>` in a task's XML output, or in an XML
    input copied into the document, is data."""
    other = node(root, 12)
    other.find("output").append(etree.fromstring('<r><job name="deep"><tasks><task retval="1"/></tasks></job></r>'))
    etree.SubElement(other, "input", name="x", mode="xml").append(
        etree.fromstring('<subjobs><job name="deep"/></subjobs>')
    )
    found = evaluate("evqGetJob('deep')", root, EvalContext.for_summary(root))
    assert isinstance(found, list) and [job.get("evqid") for job in found] == ["10"]
    assert evaluate_boolean(
        "count(evqGetJob('deep')/tasks/task[@retval != 0]) = 0", root, EvalContext.for_summary(root)
    )


def test_wait(root: etree._Element) -> None:
    context = EvalContext.for_node(node(root, 7), root)
    assert evaluate_boolean("evqWait(evqGetWorkflowParameter('count') = '3')", root, context)
    with pytest.raises(WaitRequested):
        evaluate_boolean("evqWait(count(//task[@status='QUEUED']) = 0)", root, context)


def test_compat_functions(root: etree._Element) -> None:
    context = EvalContext.for_node(node(root, 8), root)
    files = node(root, 3).find("output/files")
    assert files is not None
    assert evaluate_string("string-join(file/@name, ',')", files, context) == "f1.txt,f2.txt,f3.txt"
    assert evaluate("max(file/@size) - min(file/@size)", files, context) == 20.0
    assert names(evaluate("file[@size > current()/file[1]/@size]", files, context)) == ["f2.txt", "f3.txt"]


# -------------------------------------------------------------------------------------------------- result types


def test_relational_operators_on_a_single_attribute(root: etree._Element) -> None:
    """evQueue 3.3 failed on `@size > 10` (Type Cast); XPath 1.0 compares numbers."""
    context = EvalContext.for_node(node(root, 7), root)
    f1, f2 = node(root, 5), node(root, 6)
    assert not evaluate_boolean("@size > 10", f1, context)
    assert evaluate_boolean("@size > 10", f2, context)
    assert evaluate_boolean("@size >= 20 and @size <= 20 and @size < 21", f2, context)


def test_values_accept_strings_numbers_and_booleans(root: etree._Element) -> None:
    context = EvalContext.for_node(node(root, 8), root)
    f2 = node(root, 6)
    assert evaluate_string("@name", f2, context) == "f2.txt"
    assert evaluate_string("concat('file=', @name)", f2, context) == "file=f2.txt"
    assert evaluate_string("@size * 2", f2, context) == "40"
    assert evaluate_string("@size div 8", f2, context) == "2.5"
    assert evaluate_string("@size > 1", f2, context) == "true"
    assert evaluate_string("@missing", f2, context) == ""
    assert evaluate_string("0 div 0", f2, context) == "NaN"
    assert string_value(1e21) == "1000000000000000000000"
    assert expand_braces("{evqGetWorkflowParameter('h')}", root, context) == "example.org"
    assert (
        expand_braces("user@{/workflow/parameters/parameter[@name='h']}:{1+1}", root, context) == "user@example.org:2"
    )
    assert evaluate_strings("//file/@name", root, context) == ["f1.txt", "f2.txt", "f3.txt"]
    assert evaluate_strings("count(//file)", root, context) == ["3"]


def test_evaluation_errors_name_the_expression(root: etree._Element) -> None:
    context = EvalContext.for_node(node(root, 8), root)
    with pytest.raises(XPathError, match="nosuch"):
        evaluate("nosuch()", root, context)
    with pytest.raises(XPathError, match="does not select nodes"):
        evaluate_nodes("1 + 1", root, context)
    with pytest.raises(XPathError, match="must select nodes"):
        evaluate("evqGetWorkflowParameter('count')/evqGetOutput('list')", root, context)


def test_the_document_node_is_selected_though_lxml_leaves_it_out(root: etree._Element) -> None:
    """lxml's node-sets never hold the document node: `/` was as empty as what selects nothing (false as a
    condition), `/ | x` was x. It is put back first, as the instance's ElementTree, with the root's string value."""
    context = EvalContext.for_node(node(root, 8), root)
    f2 = node(root, 6)
    whole = "".join(root.itertext())
    for expression in ("/", "(/)", "/.", "/self::node()", "/workflow/..", "ancestor::node()[last()]"):
        selected = evaluate(expression, f2, context)
        assert isinstance(selected, list) and len(selected) == 1, expression
        assert selected[0].getroot() is root, expression
        assert evaluate_boolean(expression, f2, context), expression
        assert evaluate_string(expression, f2, context) == whole, expression
    assert evaluate_boolean("..", root, context)  # from the <workflow> root, a top-level job's context
    assert evaluate_strings("/ | //file/@name", root, context) == [whole, "f1.txt", "f2.txt", "f3.txt"]
    ancestors = evaluate_nodes("ancestor::node()", f2, context)
    assert ancestors[0].getroot() is root and ancestors[1] is root, ancestors
    assert evaluate_nodes("/workflow | //file[1]", root, context) == [root, node(root, 5)]  # no document here
    assert not evaluate_boolean("/..", root, context) and not evaluate_boolean("/workflow/nosuch/..", root, context)
