"""What checkov does not check in infra/: the handler's Contract, identities, roles and Event Grid.

The Bicep is parsed with pycep-parser (no Bicep CLI is reachable offline); module parameters are
bound to what main.bicep passes (see bicep_model.py). Each test names the fact it protects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bicep_model import INFRA, BicepFile, Deployment, dotted, parse_file, strip_comments, unwrap

REPO = INFRA.parent

# Built-in role definition GUIDs (identical in every tenant).
BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
BLOB_DATA_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
BLOB_DATA_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
OPENAI_USER = "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd"
METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"
# Roles that must never appear: far broader than anything here needs.
FORBIDDEN_ROLES = {
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635": "Owner",
    "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
    "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9": "User Access Administrator",
    "17d1049b-9a84-46fb-8f53-869881c3d3ab": "Storage Account Contributor",
    "a7264617-510b-434b-a828-9731dc254ea7": "Cognitive Services OpenAI Contributor",
    "25fbc0a9-bd7c-42a3-aa1a-3b75d497ee68": "Cognitive Services Contributor",
}

# The handler's settings in Azure (DESIGN.md Contract + the timer schedule) and their values.
CONTRACT_SETTINGS = {
    "AZURE_OPENAI_ENDPOINT": None,  # checked separately: the account's endpoint without '/'
    "AZURE_OPENAI_API_VERSION": "2025-04-01-preview",
    "BATCH_STORAGE_ACCOUNT_URL": None,  # checked separately: the blob endpoint without '/'
    "BATCH_INPUT_CONTAINER": "batch-input",
    "BATCH_OUTPUT_CONTAINER": "batch-output",
    "BATCH_STATE_CONTAINER": "batch-jobs",
    "BATCH_TIMER_SCHEDULE": "0 */5 * * * *",
}
# Development-only settings (keys, connection strings) that must not be configured in Azure.
DEV_ONLY_SETTINGS = {"AZURE_OPENAI_API_KEY", "BATCH_STORAGE_CONNECTION_STRING"}
# Settings Flex Consumption rejects or ignores.
NOT_ON_FLEX = {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE"}


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


def single(file: BicepFile, rtype: str) -> tuple[str, dict]:
    found = file.resources_of_type(rtype)
    assert len(found) == 1, f"expected one {rtype} in {file.path.name}, found {sorted(found)}"
    return next(iter(found.items()))


def function_app(deployment: Deployment) -> tuple[BicepFile, dict]:
    _, module = deployment.module_for("functionapp.bicep")
    _, site = single(module, "Microsoft.Web/sites")
    config, _ = unwrap(site)
    return module, config


def app_settings(deployment: Deployment) -> dict[str, object]:
    module, config = function_app(deployment)
    settings = config["properties"]["siteConfig"]["appSettings"]
    names = [s["name"] for s in settings]
    assert len(names) == len(set(names)), f"duplicate app settings: {names}"
    return {s["name"]: module.resolve(s["value"]) for s in settings}


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", bicep_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_bicep_file_parses(path: Path) -> None:
    tree = parse_file(path)
    assert tree.get("resources") or tree.get("modules"), f"{path.name} declares nothing"


def test_main_calls_every_module_file(deployment: Deployment) -> None:
    called = {m.path for m in deployment.modules.values()}
    on_disk = {p.resolve() for p in (INFRA / "modules").glob("*.bicep")}
    assert called == on_disk, f"modules not wired into main.bicep: {sorted(on_disk - called)}"


# --- no secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", bicep_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_no_keys_sas_or_connection_strings(path: Path) -> None:
    code = strip_comments(path.read_text(encoding="utf-8"))
    for pattern in [r"listKeys", r"listAccountSas", r"listServiceSas", r"AccountKey\s*=", r"SharedAccessSignature", r"[?&]sig="]:
        assert not re.search(pattern, code, re.IGNORECASE), f"{path.name}: `{pattern}` found"
    # The only connection string allowed is Application Insights', which is an address, not a
    # credential, once the component has DisableLocalAuth (see test_app_insights_is_entra_only).
    for line in code.splitlines():
        if re.search(r"connection_?string", line, re.IGNORECASE):
            assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in line or "appInsights.properties.ConnectionString" in line, (
                f"{path.name}: connection string outside Application Insights: {line.strip()}"
            )
    # One secret has no Entra ID alternative: Azure OpenAI signs webhooks with a shared secret
    # (Standard Webhooks). It is the one secure parameter, `webhookSecret`, and never an output.
    secure = re.findall(r"@secure\(\)\s*param\s+(\w+)", code)
    assert secure in ([], ["webhookSecret"]), f"{path.name}: secure parameters {secure}"
    assert not re.search(r"^output\b.*webhookSecret", code, re.MULTILINE), f"{path.name}: the webhook secret is an output"


def test_app_settings_hold_no_secret(deployment: Deployment) -> None:
    settings = app_settings(deployment)
    assert not (DEV_ONLY_SETTINGS & settings.keys()), "development-only credentials configured in Azure"
    for name, value in settings.items():
        if name == "APPLICATIONINSIGHTS_CONNECTION_STRING":
            assert value == "appInsights.properties.ConnectionString"
            continue
        if name == "AZURE_OPENAI_WEBHOOK_SECRET":
            # The secure parameter (resolved to its default, empty): passed at deployment,
            # never a value written in the template.
            assert value in ("", "webhookSecret"), value
            continue
        assert not re.search(r"KEY|PASSWORD|SECRET|SAS|CONNECTION_?STRING", name, re.IGNORECASE), name
        if isinstance(value, str):
            assert not re.search(r"AccountKey=|SharedAccessSignature|[?&]sig=|DefaultEndpointsProtocol", value), name


def test_host_storage_is_identity_based(deployment: Deployment) -> None:
    settings = app_settings(deployment)
    assert "AzureWebJobsStorage" not in settings, "a plain AzureWebJobsStorage is a connection string"
    host = {k: v for k, v in settings.items() if k.startswith("AzureWebJobsStorage__")}
    assert host == {"AzureWebJobsStorage__accountName": "storage.name"}, host
    module, _ = function_app(deployment)
    _, account = single(module, "Microsoft.Storage/storageAccounts")
    assert account["existing"] and module.resolve(unwrap(account)[0]["name"]) == "storage.outputs.name"


def test_deployment_container_uses_the_app_identity(deployment: Deployment) -> None:
    module, config = function_app(deployment)
    storage = config["properties"]["functionAppConfig"]["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"] == {"type": "SystemAssignedIdentity"}
    value = module.resolve(storage["value"])
    # primaryEndpoints.blob ends with '/', so this is https://<account>.blob.core.windows.net/app-package.
    assert value == "storage.properties.primaryEndpoints.blobapp-package", value
    _, storage_module = deployment.module_for("storage.bicep")
    assert "app-package" in storage_module.resolve("containerNames")


# --- Function App -----------------------------------------------------------------------------


def test_function_app_is_flex_consumption_linux_custom(deployment: Deployment) -> None:
    module, config = function_app(deployment)
    assert config["kind"] == "functionapp,linux"
    assert config["identity"]["type"] == "SystemAssigned"
    assert config["properties"]["httpsOnly"] is True
    runtime = config["properties"]["functionAppConfig"]["runtime"]
    assert runtime == {"name": "custom", "version": "1.0"}
    _, plan = single(module, "Microsoft.Web/serverfarms")
    plan_config, _ = unwrap(plan)
    assert plan_config["sku"] == {"tier": "FlexConsumption", "name": "FC1"}
    assert plan_config["properties"]["reserved"] is True, "Flex Consumption is Linux only"
    assert dotted(config["properties"]["serverFarmId"]) == "plan.id"


def test_no_settings_flex_rejects(deployment: Deployment) -> None:
    assert not (NOT_ON_FLEX & app_settings(deployment).keys())


def test_app_settings_cover_the_contract(deployment: Deployment) -> None:
    settings = app_settings(deployment)
    for name, expected in CONTRACT_SETTINGS.items():
        assert name in settings, f"missing app setting {name}"
        if expected is not None:
            assert settings[name] == expected, f"{name} = {settings[name]!r}, expected {expected!r}"


def test_contract_settings_are_the_documented_ones() -> None:
    """The names above are the README's (and local.settings.json.example's), not invented ones."""
    readme = REPO / "README.md"
    example = REPO / "local.settings.json.example"
    if readme.exists():
        documented = set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]+)`\s*\|", readme.read_text(encoding="utf-8"), re.MULTILINE))
        assert set(CONTRACT_SETTINGS) <= documented, sorted(set(CONTRACT_SETTINGS) - documented)
    if example.exists():
        values = json.loads(example.read_text(encoding="utf-8"))["Values"]
        assert set(CONTRACT_SETTINGS) <= values.keys(), sorted(set(CONTRACT_SETTINGS) - values.keys())


def strips_trailing_slash(file: BicepFile, var: str, raw: str) -> None:
    """`var` is `endsWith(raw, '/') ? substring(raw, 0, length(raw) - 1) : raw`."""
    cond = file.variables[var]["value"]["operator"]
    assert cond["type"] == "conditional", var
    test = cond["operands"]["condition"]["function"]
    assert test["type"] == "ends_with" and test["parameters"] == {"string_to_search": raw, "string_to_find": "/"}
    cut = cond["operands"]["true_value"]["function"]
    assert cut["type"] == "substring" and cut["parameters"]["string_to_parse"] == raw
    assert cut["parameters"]["start_index"] == 0
    assert cond["operands"]["false_value"] == raw


def test_endpoints_have_no_trailing_slash(deployment: Deployment) -> None:
    """The handler's settings are the accounts' endpoints (`https://<account>.blob.core.windows.net`, `https://<r>.openai.azure.com`) without a trailing slash."""
    module, config = function_app(deployment)
    raw_settings = {s["name"]: s["value"] for s in config["properties"]["siteConfig"]["appSettings"]}

    # BATCH_STORAGE_ACCOUNT_URL: the account's primaryEndpoints.blob, slash removed.
    assert raw_settings["BATCH_STORAGE_ACCOUNT_URL"] == "blobEndpointNoSlash"
    assert dotted(module.variables["blobEndpoint"]["value"]) == "storage.properties.primaryEndpoints.blob"
    strips_trailing_slash(module, "blobEndpointNoSlash", "blobEndpoint")

    # AZURE_OPENAI_ENDPOINT: the account's properties.endpoint, slash removed in main.bicep.
    assert raw_settings["AZURE_OPENAI_ENDPOINT"] == "openAiEndpoint"
    main = deployment.main
    symbol, _ = deployment.module_for("functionapp.bicep")
    # The pool: the main region first, then one endpoint per extra region, comma-separated.
    assert unwrap(main.modules[symbol])[0]["params"]["openAiEndpoint"] == "openAiEndpoints"
    joined = main.variables["openAiEndpoints"]["value"]["function"]
    assert joined["type"] == "join" and joined["parameters"]["delimiter"] == ","
    listed = joined["parameters"]["input_array"]["function"]
    assert listed["type"] == "concat"
    assert listed["parameters"] == {"arg_1": ["openAiEndpoint"], "arg_2": "extraOpenAiEndpoints"}
    extra = main.variables["extraOpenAiEndpoints"]["value"]
    assert extra["loop_type"]["detail"]["array_name"] == "extraOpenAiNames"
    # The main endpoint (slash removed) with the extra account's subdomain: the same domain in
    # every cloud, where a literal openai.azure.com would be wrong in a sovereign one.
    assert extra["config"] == {
        "function": {
            "type": "replace",
            "parameters": {
                "original_string": "openAiEndpoint",
                "old_string": "//${openAiAccountName}.",
                "new_string": "//${extraName}.",
            }
        }
    }
    strips_trailing_slash(main, "openAiEndpoint", "openAiEndpointRaw")
    openai_symbol, openai_module = deployment.module_for("openai.bicep")
    assert dotted(main.variables["openAiEndpointRaw"]["value"]) == f"{openai_symbol}.outputs.endpoint"
    assert openai_module.resolve(openai_module.outputs["endpoint"]["value"]) == "account.properties.endpoint"


def test_timer_schedule_setting_feeds_function_json(deployment: Deployment) -> None:
    timer = json.loads((REPO / "function-timer" / "function.json").read_text(encoding="utf-8"))
    binding = next(b for b in timer["bindings"] if b["type"] == "timerTrigger")
    assert binding["schedule"] == "%BATCH_TIMER_SCHEDULE%"
    assert app_settings(deployment)["BATCH_TIMER_SCHEDULE"] == "0 */5 * * * *"


def test_app_insights_is_entra_only(deployment: Deployment) -> None:
    settings = app_settings(deployment)
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "Authorization=AAD"
    assert settings["APPLICATIONINSIGHTS_CONNECTION_STRING"] == "appInsights.properties.ConnectionString"
    _, monitoring = deployment.module_for("monitoring.bicep")
    _, component = single(monitoring, "Microsoft.Insights/components")
    props = unwrap(component)[0]["properties"]
    assert props["DisableLocalAuth"] is True, "with local auth on, the connection string is a credential"
    assert dotted(props["WorkspaceResourceId"]) == "workspace.id"


# --- Storage ------------------------------------------------------------------------------------


def test_storage_account_is_locked_to_entra_id(deployment: Deployment) -> None:
    _, module = deployment.module_for("storage.bicep")
    _, account = single(module, "Microsoft.Storage/storageAccounts")
    config, _ = unwrap(account)
    assert config["kind"] == "StorageV2", "only StorageV2 (and blob-only kinds) emit BlobCreated events"
    props = config["properties"]
    assert props["allowSharedKeyAccess"] is False
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["allowBlobPublicAccess"] is False
    assert props["supportsHttpsTrafficOnly"] is True
    assert props.get("isHnsEnabled") in (None, False), "HNS changes BlobCreated semantics (FlushWithClose)"


def test_contract_containers_exist_and_are_private(deployment: Deployment) -> None:
    _, module = deployment.module_for("storage.bicep")
    names = module.resolve("containerNames")
    assert set(names) == {"batch-input", "batch-output", "batch-jobs", "batch-deadletter", "app-package"}
    _, containers = single(module, "Microsoft.Storage/storageAccounts/blobServices/containers")
    assert unwrap(containers)[0]["properties"]["publicAccess"] == "None"


# --- Azure OpenAI -------------------------------------------------------------------------------


def test_openai_account_has_system_assigned_identity_and_no_keys(deployment: Deployment) -> None:
    _, module = deployment.module_for("openai.bicep")
    _, account = single(module, "Microsoft.CognitiveServices/accounts")
    config, _ = unwrap(account)
    assert config["kind"] == "OpenAI"
    # The batch blob feature supports only the system-assigned identity.
    assert config["identity"] == {"type": "SystemAssigned"}
    assert config["properties"]["disableLocalAuth"] is True
    assert config["properties"]["customSubDomainName"] == "name" and config["name"] == "name"


def test_model_deployment_is_a_batch_deployment(deployment: Deployment) -> None:
    _, module = deployment.module_for("openai.bicep")
    _, dep = single(module, "Microsoft.CognitiveServices/accounts/deployments")
    config, _ = unwrap(dep)
    assert module.resolve(config["sku"]["name"]) == "GlobalBatch"
    assert set(module.decorator("skuName", "allowed")) == {"GlobalBatch", "DataZoneBatch"}
    assert set(deployment.main.decorator("modelSku", "allowed")) == {"GlobalBatch", "DataZoneBatch"}
    model = config["properties"]["model"]
    assert model["format"] == "OpenAI"
    assert module.resolve(model["name"]) == "gpt-4o-mini" and module.resolve(model["version"]) == "2024-07-18"


# --- Event Grid ---------------------------------------------------------------------------------


def event_grid(deployment: Deployment) -> tuple[BicepFile, dict, dict, object]:
    _, module = deployment.module_for("eventgrid.bicep")
    _, topic = single(module, "Microsoft.EventGrid/systemTopics")
    _, sub = single(module, "Microsoft.EventGrid/systemTopics/eventSubscriptions")
    sub_config, condition = unwrap(sub)
    return module, unwrap(topic)[0], sub_config, condition


def test_event_subscription_filters_blob_created_and_deleted_jsonl_in_batch_input(deployment: Deployment) -> None:
    module, _, sub, _ = event_grid(deployment)
    props = sub["properties"]
    flt = module.resolve(props["filter"])
    # Created: a file to submit. Deleted: its job is cancelled (issue 16).
    assert flt["includedEventTypes"] == ["Microsoft.Storage.BlobCreated", "Microsoft.Storage.BlobDeleted"]
    assert flt["subjectBeginsWith"] == "/blobServices/default/containers/batch-input/"
    assert flt["subjectEndsWith"] == ".jsonl"
    assert flt.get("isSubjectCaseSensitive") is True, "the handler takes `.jsonl` case-sensitively"
    assert "advancedFilters" not in flt


def test_event_subscription_targets_function_trigger(deployment: Deployment) -> None:
    module, _, sub, _ = event_grid(deployment)
    dest = sub["properties"]["destination"]
    assert dest["endpointType"] == "AzureFunction"
    function_app_symbol, _ = deployment.module_for("functionapp.bicep")
    assert module.resolve(dest["properties"]["resourceId"]) == f"{function_app_symbol}.outputs.id/functions/function-trigger"
    assert module.resolve(dest["properties"]["maxEventsPerBatch"]) == 1
    # ... and that function exists in the package with an Event Grid trigger named `event`.
    fn = json.loads((REPO / "function-trigger" / "function.json").read_text(encoding="utf-8"))
    assert [(b["type"], b["name"]) for b in fn["bindings"]] == [("eventGridTrigger", "event")]
    assert sub["properties"]["eventDeliverySchema"] == "EventGridSchema"


def test_event_subscription_retries_then_dead_letters_with_identity(deployment: Deployment) -> None:
    module, topic, sub, _ = event_grid(deployment)
    props = module.resolve(sub["properties"])
    retry = props["retryPolicy"]
    assert 1 <= retry["maxDeliveryAttempts"] <= 30 and retry["maxDeliveryAttempts"] == 30
    assert 1 <= retry["eventTimeToLiveInMinutes"] <= 1440 and retry["eventTimeToLiveInMinutes"] == 1440
    assert "deadLetterDestination" not in props, "dead-lettering must use the topic identity, not a key"
    dl = props["deadLetterWithResourceIdentity"]
    assert dl["identity"] == {"type": "SystemAssigned"}
    assert dl["deadLetterDestination"]["endpointType"] == "StorageBlob"
    assert dl["deadLetterDestination"]["properties"]["blobContainerName"] == "batch-deadletter"
    assert dl["deadLetterDestination"]["properties"]["resourceId"] == "storage.id"
    assert topic["identity"] == {"type": "SystemAssigned"}
    assert topic["properties"]["topicType"] == "Microsoft.Storage.StorageAccounts"
    assert dotted(topic["properties"]["source"]) == "storage.id"


def test_event_subscription_is_step_two(deployment: Deployment) -> None:
    """The AzureFunction endpoint needs the published function: off by default, switched on later."""
    module, _, _, condition = event_grid(deployment)
    assert condition == "deployEventSubscription"
    assert module.resolve(condition) is False
    assert deployment.main.parameters["deployEventSubscription"]["default"] is False


# --- Roles --------------------------------------------------------------------------------------


def role_assignments(deployment: Deployment) -> list[dict]:
    """Every role assignment with its principal, role GUID and scope, traced across files."""
    found = []
    for file in deployment.all_files():
        for symbol, res in file.resources_of_type("Microsoft.Authorization/roleAssignments").items():
            config, condition = unwrap(res)
            role_fn = config["properties"]["roleDefinitionId"]["function"]
            assert role_fn["type"] == "subscription_resource_id", f"{symbol}: role id must be a built-in definition"
            assert role_fn["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
            role = file.resolve(role_fn["parameters"]["resource_name_1"])
            assert "scope" in config, f"{symbol}: no scope means resource-group scope, broader than needed"
            scope_symbol = config["scope"]
            scope_res = file.resources[scope_symbol]
            scope_config, _ = unwrap(scope_res)
            found.append(
                {
                    "symbol": symbol,
                    "file": file,
                    "conditional": condition is not None,
                    "role": role,
                    "principal": file.resolve(config["properties"]["principalId"]),
                    "principalType": file.resolve(config["properties"]["principalType"]),
                    "scope_type": scope_res["type"],
                    "scope_name": file.resolve(scope_config["name"]),
                    "name_expr": config["name"],
                }
            )
    return found


def principal_of(deployment: Deployment, reference: str) -> tuple[str, str]:
    """`mod.outputs.principalId` -> (resource type, identity type) of the resource behind it."""
    module, symbol, res = deployment.resource_behind(reference)
    _, value = deployment.output_source(reference)
    assert value == f"{symbol}.identity.principalId", f"{reference} is not an identity's principal id: {value}"
    config, _ = unwrap(res)
    return res["type"], config["identity"]["type"]


def test_required_role_assignments_are_present(deployment: Deployment) -> None:
    grants = set()
    for ra in role_assignments(deployment):
        # The extra regions' grants are looped over extraOpenAiLocations: checked on their own below.
        if ra["conditional"] or ra["file"].path.name == "region.bicep":
            continue
        principal_type, identity = principal_of(deployment, ra["principal"])
        assert identity == "SystemAssigned"
        assert ra["principalType"] == "ServicePrincipal"
        grants.add((principal_type, ra["role"], ra["scope_type"], ra["scope_name"]))

    storage_symbol, _ = deployment.module_for("storage.bicep")
    openai_symbol, _ = deployment.module_for("openai.bicep")
    monitoring_symbol, _ = deployment.module_for("monitoring.bicep")
    account = ("Microsoft.Storage/storageAccounts", f"{storage_symbol}.outputs.name")
    openai = ("Microsoft.CognitiveServices/accounts", f"{openai_symbol}.outputs.name")
    insights = ("Microsoft.Insights/components", f"{monitoring_symbol}.outputs.appInsightsName")
    dead_letter = ("Microsoft.Storage/storageAccounts/blobServices/containers", "batch-deadletter")
    site, aoai, topic = "Microsoft.Web/sites", "Microsoft.CognitiveServices/accounts", "Microsoft.EventGrid/systemTopics"

    expected = {
        # Functions host storage (identity-based AzureWebJobsStorage) + the handler's blob work.
        (site, BLOB_DATA_OWNER, *account),
        # Host diagnostic events in table storage.
        (site, TABLE_DATA_CONTRIBUTOR, *account),
        # Batch REST calls with an Entra ID token.
        (site, OPENAI_USER, *openai),
        # Application Insights with Authorization=AAD.
        (site, METRICS_PUBLISHER, *insights),
        # The batch service reads input_blob and writes output_folder with its own identity.
        (aoai, BLOB_DATA_CONTRIBUTOR, *account),
        # Event Grid dead-lettering with the system topic's identity.
        (topic, BLOB_DATA_CONTRIBUTOR, *dead_letter),
    }
    assert grants == expected, f"missing: {expected - grants}\nunexpected: {grants - expected}"


def test_every_extra_region_gets_the_main_regions_deployment_and_roles(deployment: Deployment) -> None:
    """extraOpenAiLocations: one more account per region, same deployment, same two grants."""
    main = deployment.main
    assert main.parameters["extraOpenAiLocations"]["default"] == [], "one region unless asked"
    symbol, region = deployment.module_for("region.bicep")
    loop = main.modules[symbol]["config"]["loop_type"]
    assert loop["detail"]["array_name"] == "extraOpenAiLocations"
    params, _ = unwrap(main.modules[symbol])
    same = {"deploymentName": "modelDeploymentName", "modelName": "modelName", "modelVersion": "modelVersion",
            "skuName": "modelSku", "capacity": "modelCapacity"}
    for name, main_param in same.items():
        assert params["params"][name] == main_param, name
    # The account and its deployment come from openai.bicep, as the main region's do.
    (nested,) = region.modules.values()
    assert nested["detail"]["path"] == "openai.bicep"
    assert unwrap(nested)[0]["params"]["deploymentName"] == "deploymentName"

    grants = {
        (ra["role"], ra["scope_type"], ra["principal"])
        for ra in role_assignments(deployment)
        if ra["file"].path.name == "region.bicep"
    }
    assert grants == {
        # The handler's batch calls with an Entra ID token.
        (OPENAI_USER, "Microsoft.CognitiveServices/accounts", "functionApp.outputs.principalId"),
        # The batch service reads input_blob and writes output_folder with the account's identity.
        (BLOB_DATA_CONTRIBUTOR, "Microsoft.Storage/storageAccounts", "openAi.outputs.principalId"),
    }, grants
    # openAi.outputs.principalId is the account's system-assigned identity (openai.bicep).
    _, openai_file = deployment.module_for("openai.bicep")
    assert openai_file.resolve(openai_file.outputs["principalId"]["value"]) == "account.identity.principalId"


def test_no_role_is_broader_than_needed(deployment: Deployment) -> None:
    for ra in role_assignments(deployment):
        assert ra["role"] not in FORBIDDEN_ROLES, f"{ra['symbol']}: {FORBIDDEN_ROLES.get(ra['role'])}"
        assert ra["scope_type"] not in ("Microsoft.Resources/resourceGroups", "Microsoft.Resources/subscriptions")


def test_optional_user_roles_are_container_scoped(deployment: Deployment) -> None:
    optional = [ra for ra in role_assignments(deployment) if ra["conditional"]]
    got = {(ra["role"], ra["scope_type"], ra["scope_name"]) for ra in optional}
    container = "Microsoft.Storage/storageAccounts/blobServices/containers"
    assert got == {(BLOB_DATA_CONTRIBUTOR, container, "batch-input"), (BLOB_DATA_READER, container, "batch-output")}
    assert deployment.main.parameters["userPrincipalId"]["default"] == ""


def test_role_assignment_names_are_deterministic(deployment: Deployment) -> None:
    """guid(scope, principal, role): re-deploying updates instead of colliding."""
    for ra in role_assignments(deployment):
        fn = ra["name_expr"]["function"]
        assert fn["type"] == "guid", ra["symbol"]
        params = list(fn["parameters"].values())
        assert len(params) == 3, ra["symbol"]


# --- the dashboard (issue 16) ---------------------------------------------------------------------

# The panels the README describes, by the item names in the workbook JSON.
WORKBOOK_PANELS = {
    "files-over-time",
    "jobs-by-status",
    "tokens-total",
    "tokens-over-time",
    "upload-to-results",
    "latest-failures",
}


def workbook(deployment: Deployment) -> tuple[str, BicepFile, dict]:
    symbol, module = deployment.module_for("workbook.bicep")
    _, resource = single(module, "Microsoft.Insights/workbooks")
    config, condition = unwrap(resource)
    assert condition is None, "the dashboard is always deployed"
    return symbol, module, config


def workbook_json(deployment: Deployment) -> tuple[str, dict]:
    """The workbook's serializedData: the JSON file it loads, with the placeholders replaced."""
    _, module, config = workbook(deployment)
    data = module.resolve(config["properties"]["serializedData"])
    assert data["function"]["type"] == "replace", data
    params = data["function"]["parameters"]
    loaded = params["original_string"]["function"]
    assert loaded["type"] == "load_text_content", loaded
    path = (module.path.parent / loaded["parameters"]["file_path"]).resolve()
    text = path.read_text(encoding="utf-8")
    placeholder = params["old_string"]
    assert placeholder in text, f"{path.name} never uses {placeholder}: the replace does nothing"
    assert dotted(params["new_string"]) == "appInsights.id"
    return text, json.loads(text.replace(placeholder, "/subscriptions/x/resourceGroups/rg/providers/microsoft.insights/components/appi"))


def test_workbook_is_deployed_on_the_app_insights_component(deployment: Deployment) -> None:
    _, module, config = workbook(deployment)
    assert config["kind"] == "shared", "a shared workbook is visible to everyone with access to the component"
    props = config["properties"]
    assert props["category"] == "workbook"
    assert dotted(props["sourceId"]) == "appInsights.id"
    # appInsights is the component monitoring.bicep creates, referenced by name.
    component = module.resources["appInsights"]
    assert component["existing"] is True
    assert component["type"] == "Microsoft.Insights/components"
    name = module.resolve(unwrap(component)[0]["name"])
    source, value = deployment.output_source(name)
    assert source.path.name == "monitoring.bicep" and value == "appInsights.name", (name, value)
    # A GUID derived from the component: a redeployment updates the same workbook.
    guid = unwrap(module.resources["workbook"])[0]["name"]["function"]
    assert guid["type"] == "guid" and dotted(guid["parameters"]["base_string"]) == "appInsights.id"
    assert "dashboardName" in deployment.main.outputs


def test_workbook_json_parses_and_every_panel_has_a_query(deployment: Deployment) -> None:
    _, wb = workbook_json(deployment)
    assert wb["version"] == "Notebook/1.0"
    queries = {item["name"]: item["content"] for item in wb["items"] if item["type"] == 3}
    assert set(queries) == WORKBOOK_PANELS, sorted(queries)
    for name, content in queries.items():
        query = content["query"]
        assert query.strip(), f"panel {name} has an empty query"
        assert content["resourceType"] == "microsoft.insights/components", name
        # The handler's lines are in traces; fields are read by the convention tests/workbook.rs checks.
        assert re.search(r"^traces$", query, re.MULTILINE), f"panel {name} does not read traces"
        assert 'extract(@"\\bevent=' in query, f"panel {name} does not read event="
        assert content.get("title"), f"panel {name} has no title"
        assert "timeContextFromParameter" in content or "timeContext" in content, name
    params = [p["name"] for item in wb["items"] if item["type"] == 9 for p in item["content"]["parameters"]]
    for content in queries.values():
        for used in re.findall(r"\{(\w+)(?::\w+)?\}", content["query"]) + [content.get("timeContextFromParameter")]:
            assert used is None or used in params, f"{content['title']}: unknown parameter {used}"


# --- outputs and hygiene ----------------------------------------------------------------------


def test_outputs_tell_users_what_they_need(deployment: Deployment) -> None:
    outputs = deployment.main.outputs
    for name in [
        "functionAppName",
        "storageAccountName",
        "blobEndpoint",
        "inputContainerUrl",
        "outputContainerUrl",
        "stateContainerUrl",
        "openAiEndpoint",
        "modelDeploymentName",
    ]:
        assert name in outputs, f"missing output {name}"
    assert deployment.main.resolve(outputs["inputContainerUrl"]["value"]).endswith("/batch-input")
    assert deployment.main.resolve(outputs["outputContainerUrl"]["value"]).endswith("/batch-output")
    assert deployment.main.resolve(outputs["stateContainerUrl"]["value"]).endswith("/batch-jobs")


def test_every_output_the_readme_reads_exists(deployment: Deployment) -> None:
    # The deploy steps read outputs by name; a renamed or missing one fails there, in Azure.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    read = set(re.findall(r"properties\.outputs\.(\w+)\.value", readme))
    assert "openAiAccountName" in read, "README's dynamic quota step reads the account name"
    missing = read - set(deployment.main.outputs)
    assert not missing, f"README reads outputs main.bicep does not declare: {sorted(missing)}"


def test_names_default_to_unique_strings(deployment: Deployment) -> None:
    main = deployment.main
    suffix = main.parameters["nameSuffix"]["default"]
    assert suffix["function"]["type"] == "unique_string", suffix
    for param in ["storageAccountName", "functionAppName", "openAiAccountName"]:
        assert "${nameSuffix}" in main.parameters[param]["default"], param


@pytest.mark.parametrize("path", bicep_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_checkov_skip_is_justified(path: Path) -> None:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if "checkov:skip" in line:
            m = re.search(r"//\s*checkov:skip=(CKV2?_[A-Z]+_\d+):(.+)$", line)
            assert m, f"{path.name}:{number}: malformed skip: {line.strip()}"
            assert len(m.group(2).strip()) >= 40, f"{path.name}:{number}: give a real reason for {m.group(1)}"


def test_handled_webhook_ids_expire_after_a_day(deployment: Deployment) -> None:
    """`batch-jobs/webhooks/{id}` records matter for the 5 minutes a delivery is accepted; the
    storage lifecycle deletes them, so they do not pile up."""
    _, storage_module = deployment.module_for("storage.bicep")
    _, policy = single(storage_module, "Microsoft.Storage/storageAccounts/managementPolicies")
    config, _ = unwrap(policy)
    [rule] = config["properties"]["policy"]["rules"]
    assert rule["definition"]["actions"]["baseBlob"]["delete"] == {"daysAfterModificationGreaterThan": 1}
    assert rule["definition"]["filters"]["blobTypes"] == ["blockBlob"]
    # The prefix is the state container's webhooks/ folder (the handler's SEEN_PREFIX).
    assert "'${stateContainerName}/webhooks/'" in (INFRA / "main.bicep").read_text(encoding="utf-8")
