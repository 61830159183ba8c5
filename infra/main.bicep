// aoai-blob-batch: everything in one resource-group deployment.
//
//   storage account (Entra-only) ── batch-input ──BlobCreated/Deleted──▶ Event Grid ──▶ function-trigger
//        │                          batch-output ◀── Azure OpenAI Batch (its own identity)
//        │                          batch-jobs (job records), batch-deadletter, app-package
//   Flex Consumption Function App (runtime custom, the Rust `handler`) ── timer ── function-timer
//   Azure OpenAI account (system-assigned identity) + a GlobalBatch / DataZoneBatch deployment
//   Log Analytics + Application Insights (Entra ID auth) + the dashboard workbook on it
//   role assignments (modules/roles.bicep)
//
// Deploy in two steps (infra/README.md):
//   1. az deployment group create -g <rg> -f infra/main.bicep
//      scripts/package && cd dist/publish && func azure functionapp publish <functionAppName>
//   2. az deployment group create -g <rg> -f infra/main.bicep -p deployEventSubscription=true
// The Event Grid subscription targets the function `function-trigger`, which exists only once the
// code is published. Without it, function-timer's sweep still submits new inputs every 5 minutes.

@description('Region of every resource except, optionally, Azure OpenAI.')
param location string = resourceGroup().location

@description('Region of the Azure OpenAI account (must offer the model as a batch deployment).')
param openAiLocation string = location

@description('Regions of extra Azure OpenAI accounts, each with the same batch deployment and roles: the handler admits each job to whichever region has room in its enqueued-token quota. Empty: one region.')
param extraOpenAiLocations array = []

@description('Suffix that makes default names unique.')
param nameSuffix string = uniqueString(resourceGroup().id)

@description('Storage account name (3-24 lowercase letters and digits, globally unique).')
@minLength(3)
@maxLength(24)
param storageAccountName string = 'st${nameSuffix}'

@description('Function App name (becomes <name>.azurewebsites.net).')
param functionAppName string = 'func-aoaibatch-${nameSuffix}'

@description('Azure OpenAI account name and custom subdomain (globally unique).')
param openAiAccountName string = 'oai-aoaibatch-${nameSuffix}'

@description('Model deployment name: the value every input line must carry in `body.model`.')
param modelDeploymentName string = 'gpt-4o-mini-batch'

@description('Model to deploy.')
param modelName string = 'gpt-4o-mini'

@description('Model version.')
param modelVersion string = '2024-07-18'

@description('Batch deployment type.')
@allowed([
  'GlobalBatch'
  'DataZoneBatch'
])
param modelSku string = 'GlobalBatch'

@description('Deployment capacity (sku.capacity); stay within your enqueued-token quota for this model.')
@minValue(1)
param modelCapacity int = 50

@description('Azure OpenAI data-plane API version the handler uses (`v1` selects /openai/v1/). Only these create batches from Blob Storage (`input_blob`); the handler refuses any other at start-up.')
@allowed([
  '2025-04-01-preview'
  'v1'
])
param openAiApiVersion string = '2025-04-01-preview'

@description('NCRONTAB schedule of function-timer: poll jobs, harvest results, sweep missed inputs.')
param timerSchedule string = '0 */5 * * * *'

@description('Step 2: create the Event Grid subscription. Only after the code is published.')
param deployEventSubscription bool = false

@description('Event Grid delivery attempts before an event is dead-lettered.')
@minValue(1)
@maxValue(30)
param eventMaxDeliveryAttempts int = 30

@description('Minutes Event Grid keeps retrying an event.')
@minValue(1)
@maxValue(1440)
param eventTimeToLiveInMinutes int = 1440

@description('Flex Consumption: maximum instances (40-1000).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Flex Consumption: memory per instance in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Optional: the webhook signing secret(s) (`whsec_…`, comma-separated while rotating) that `handler webhook register` wrote to its file. Empty: function-webhook refuses every event and the timer alone moves jobs on.')
@secure()
param webhookSecret string = ''

@description('Optional object id of a user/group/service principal allowed to upload inputs and read results (e.g. `az ad signed-in-user show --query id -o tsv`).')
param userPrincipalId string = ''

@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param userPrincipalType string = 'User'

param tags object = {
  app: 'aoai-blob-batch'
}

// Container names are part of the handler's Contract (DESIGN.md); keep them fixed.
var inputContainerName = 'batch-input'
var outputContainerName = 'batch-output'
var stateContainerName = 'batch-jobs'
var deadLetterContainerName = 'batch-deadletter'
var deploymentContainerName = 'app-package'

// The function that receives BlobCreated and BlobDeleted events (folder function-trigger/ of the package).
var triggerFunctionName = 'function-trigger'

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: storageAccountName
    location: location
    tags: tags
    containerNames: [
      inputContainerName
      outputContainerName
      stateContainerName
      deadLetterContainerName
      deploymentContainerName
    ]
    // The handler's record of each handled webhook id (src/webhook/mod.rs, SEEN_PREFIX).
    oneDayPrefixes: [
      '${stateContainerName}/webhooks/'
    ]
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    workspaceName: 'log-${functionAppName}'
    appInsightsName: 'appi-${functionAppName}'
    location: location
    tags: tags
  }
}

// The dashboard (README, The dashboard): a workbook on the Application Insights component.
module workbook 'modules/workbook.bicep' = {
  name: 'workbook'
  params: {
    appInsightsName: monitoring.outputs.appInsightsName
    location: location
    tags: tags
    displayName: 'Batch jobs (${functionAppName})'
  }
}

module openAi 'modules/openai.bicep' = {
  name: 'openai'
  params: {
    name: openAiAccountName
    location: openAiLocation
    tags: tags
    deploymentName: modelDeploymentName
    modelName: modelName
    modelVersion: modelVersion
    skuName: modelSku
    capacity: modelCapacity
  }
}

// The extra regions of the pool: an account per location, named after the main one and its
// region, so their names and endpoints are known before the deployment runs.
var extraOpenAiNames = [for extraLocation in extraOpenAiLocations: take('${openAiAccountName}-${extraLocation}', 64)]

module extraRegions 'modules/region.bicep' = [for (extraLocation, i) in extraOpenAiLocations: {
  name: 'region-${i}'
  params: {
    name: extraOpenAiNames[i]
    location: extraLocation
    tags: tags
    deploymentName: modelDeploymentName
    modelName: modelName
    modelVersion: modelVersion
    skuName: modelSku
    capacity: modelCapacity
    storageAccountName: storage.outputs.name
    functionAppPrincipalId: functionApp.outputs.principalId
  }
}]

// The handler wants endpoints without a trailing slash.
var openAiEndpointRaw = openAi.outputs.endpoint
var openAiEndpoint = endsWith(openAiEndpointRaw, '/') ? substring(openAiEndpointRaw, 0, length(openAiEndpointRaw) - 1) : openAiEndpointRaw
// Each extra account's endpoint is the main one's with its own subdomain (the account name), so
// it has the main account's domain in every cloud (openai.azure.com, or a sovereign cloud's).
// Read from the accounts themselves it would make a cycle: they grant the function app a role.
var extraOpenAiEndpoints = [for extraName in extraOpenAiNames: replace(openAiEndpoint, '//${openAiAccountName}.', '//${extraName}.')]
// AZURE_OPENAI_ENDPOINT: the main region first (jobs recorded before the pool use it), then the others.
var openAiEndpoints = join(concat([openAiEndpoint], extraOpenAiEndpoints), ',')
var blobEndpointRaw = storage.outputs.blobEndpoint
var blobEndpoint = endsWith(blobEndpointRaw, '/') ? substring(blobEndpointRaw, 0, length(blobEndpointRaw) - 1) : blobEndpointRaw

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    name: functionAppName
    planName: 'plan-${functionAppName}'
    location: location
    tags: tags
    storageAccountName: storage.outputs.name
    deploymentContainerName: deploymentContainerName
    appInsightsName: monitoring.outputs.appInsightsName
    openAiEndpoint: openAiEndpoints
    openAiApiVersion: openAiApiVersion
    inputContainerName: inputContainerName
    outputContainerName: outputContainerName
    stateContainerName: stateContainerName
    timerSchedule: timerSchedule
    webhookSecret: webhookSecret
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
}

module eventGrid 'modules/eventgrid.bicep' = {
  name: 'eventgrid'
  params: {
    systemTopicName: 'evgt-${storageAccountName}'
    location: location
    tags: tags
    storageAccountName: storage.outputs.name
    deployEventSubscription: deployEventSubscription
    functionAppId: functionApp.outputs.id
    functionName: triggerFunctionName
    inputContainerName: inputContainerName
    deadLetterContainerName: deadLetterContainerName
    maxDeliveryAttempts: eventMaxDeliveryAttempts
    eventTimeToLiveInMinutes: eventTimeToLiveInMinutes
  }
}

module roles 'modules/roles.bicep' = {
  name: 'roles'
  params: {
    storageAccountName: storage.outputs.name
    openAiAccountName: openAi.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
    inputContainerName: inputContainerName
    outputContainerName: outputContainerName
    deadLetterContainerName: deadLetterContainerName
    functionAppPrincipalId: functionApp.outputs.principalId
    openAiPrincipalId: openAi.outputs.principalId
    eventGridPrincipalId: eventGrid.outputs.principalId
    userPrincipalId: userPrincipalId
    userPrincipalType: userPrincipalType
  }
}

output functionAppName string = functionApp.outputs.name
output storageAccountName string = storage.outputs.name
output blobEndpoint string = blobEndpoint
output inputContainerUrl string = '${blobEndpoint}/${inputContainerName}'
output outputContainerUrl string = '${blobEndpoint}/${outputContainerName}'
output stateContainerUrl string = '${blobEndpoint}/${stateContainerName}'
output deadLetterContainerUrl string = '${blobEndpoint}/${deadLetterContainerName}'
output openAiEndpoint string = openAiEndpoint
output openAiAccountName string = openAi.outputs.name
@description('Every endpoint of the pool, as AZURE_OPENAI_ENDPOINT lists them.')
output openAiEndpoints string = openAiEndpoints
@description('Put this in `body.model` on every input line.')
output modelDeploymentName string = openAi.outputs.deploymentName
output eventSubscriptionDeployed bool = deployEventSubscription
@description('The dashboard: Application Insights resource, Workbooks, this title.')
output dashboardName string = workbook.outputs.displayName
