// One StorageV2 account for everything the system keeps in blobs:
//   batch-input       where users drop `.jsonl` files (the batch `input_blob`)
//   batch-output      where results land (the batch `output_folder`)
//   batch-jobs        the handler's job records (`active/`, `done/`)
//   batch-deadletter  Event Grid deliveries that never succeeded
//   <deployment>      the Flex Consumption app package (the host deploys from it)
// plus the Functions host's own containers (azure-webjobs-hosts, azure-webjobs-secrets), which the
// host creates itself through its identity-based AzureWebJobsStorage connection.
//
// Access is Microsoft Entra ID only: shared key authorization is disabled, so no account key or
// connection string can be used against this account, and none appears anywhere in this template.

@description('Storage account name: 3-24 lowercase letters and digits, globally unique.')
@minLength(3)
@maxLength(24)
param name string

param location string
param tags object = {}

@description('Redundancy. LRS is enough for a staging area whose inputs users still have; pick ZRS/GZRS for production data.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param skuName string = 'Standard_LRS'

@description('Containers to create (all private).')
param containerNames array

@description('Days a deleted or overwritten blob can still be restored.')
@minValue(1)
@maxValue(365)
param softDeleteDays int = 7

@description('Blob name prefixes (`container/path/`) of short-lived records, deleted a day after their last write: the handled webhook ids, which matter for 5 minutes (an older delivery is refused by its timestamp anyway).')
param oneDayPrefixes array = []

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    // checkov:skip=CKV_AZURE_206:Redundancy is the skuName parameter; LRS is the default because it exists in every region and inputs are re-uploadable. Choose Standard_ZRS/GZRS for production.
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    supportsHttpsTrafficOnly: true
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    // Entra ID only: the Functions host, the handler, Azure OpenAI and Event Grid all use managed
    // identities. With shared key off, a leaked key or account SAS is useless.
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    // Public endpoint, Entra ID only. The Flex app (without VNet integration), Event Grid's
    // dead-lettering and the Azure OpenAI batch service all reach the account over it; a firewall
    // would have to admit each of them (private endpoints + VNet integration: see README).
    // checkov:skip=CKV_AZURE_59:Public endpoint needed by Flex Consumption without VNet, Event Grid dead-lettering and the Azure OpenAI batch service; every request needs an Entra ID token because shared key access is disabled.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      // checkov:skip=CKV_AZURE_35:Same reason as CKV_AZURE_59: the callers above come from outside any VNet; authorization is Entra ID RBAC, not the network.
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteDays
    }
  }
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [
  for containerName in containerNames: {
    parent: blobService
    name: containerName
    properties: {
      publicAccess: 'None'
    }
  }
]

resource lifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = if (!empty(oneDayPrefixes)) {
  parent: storage
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'expire-short-lived-records'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: oneDayPrefixes
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: 1
                }
              }
            }
          }
        }
      ]
    }
  }
}

output id string = storage.id
output name string = storage.name
// primaryEndpoints.blob is `https://<account>.blob.core.windows.net/` (with the trailing slash).
output blobEndpoint string = storage.properties.primaryEndpoints.blob
