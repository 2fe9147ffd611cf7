"""acme's own CI: one file, Switchyard's conformance kit does the rest."""
import pytest

from registry.conformance import check_case, conformance_cases


@pytest.mark.parametrize("case", conformance_cases("acme"), ids=str)
def test_acme_conforms(case):
    check_case(case)
