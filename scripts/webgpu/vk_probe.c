/*
 * Print, as one JSON object, the Vulkan physical devices the loader offers this process (the environment's
 * VK_ICD_FILENAMES decides which drivers it loads): name, ids, driver, shaderFloat16, 16-bit storage, subgroup
 * sizes, maxStorageBufferRange. The WebGPU tests run it with the same environment as onnxruntime-node, whose
 * built-in Dawn exposes no adapter description to JavaScript, to assert the adapter it can get.
 */
#include <stdio.h>
#include <string.h>
#include <vulkan/vulkan.h>

static void json_str(const char *s) {
  putchar('"');
  for (; *s; ++s) {
    if (*s == '"' || *s == '\\') putchar('\\');
    if ((unsigned char)*s >= 0x20) putchar(*s);
  }
  putchar('"');
}

int main(void) {
  VkApplicationInfo app = {VK_STRUCTURE_TYPE_APPLICATION_INFO, NULL, "graphkit-vk-probe", 1, "graphkit", 1, VK_API_VERSION_1_3};
  VkInstanceCreateInfo ci = {VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, NULL, 0, &app, 0, NULL, 0, NULL};
  VkInstance inst;
  VkResult r = vkCreateInstance(&ci, NULL, &inst);
  if (r != VK_SUCCESS) {
    printf("{\"error\": \"vkCreateInstance failed (%d): no Vulkan driver found\", \"devices\": []}\n", (int)r);
    return 1;
  }
  uint32_t n = 0;
  vkEnumeratePhysicalDevices(inst, &n, NULL);
  VkPhysicalDevice devs[16];
  if (n > 16) n = 16;
  vkEnumeratePhysicalDevices(inst, &n, devs);
  printf("{\"devices\": [");
  for (uint32_t i = 0; i < n; ++i) {
    VkPhysicalDeviceDriverProperties drv = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES};
    VkPhysicalDeviceSubgroupSizeControlProperties sgc = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_PROPERTIES, &drv};
    VkPhysicalDeviceSubgroupProperties sg = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES, &sgc};
    VkPhysicalDeviceProperties2 p = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, &sg};
    vkGetPhysicalDeviceProperties2(devs[i], &p);
    VkPhysicalDevice16BitStorageFeatures st16 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_16BIT_STORAGE_FEATURES};
    VkPhysicalDeviceShaderFloat16Int8Features f16 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES, &st16};
    VkPhysicalDeviceFeatures2 f = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, &f16};
    vkGetPhysicalDeviceFeatures2(devs[i], &f);
    printf("%s{\"name\": ", i ? ", " : "");
    json_str(p.properties.deviceName);
    printf(", \"vendor_id\": %u, \"device_id\": %u, \"device_type\": %d, \"driver\": ", p.properties.vendorID,
           p.properties.deviceID, (int)p.properties.deviceType);
    json_str(drv.driverName);
    printf(", \"driver_info\": ");
    json_str(drv.driverInfo);
    printf(", \"api_version\": \"%u.%u.%u\", \"shader_float16\": %s, \"storage_buffer_16bit\": %s, "
           "\"subgroup_size\": %u, \"subgroup_min_size\": %u, \"subgroup_max_size\": %u, "
           "\"max_storage_buffer_range\": %u}",
           VK_API_VERSION_MAJOR(p.properties.apiVersion), VK_API_VERSION_MINOR(p.properties.apiVersion),
           VK_API_VERSION_PATCH(p.properties.apiVersion), f16.shaderFloat16 ? "true" : "false",
           st16.storageBuffer16BitAccess ? "true" : "false", sg.subgroupSize, sgc.minSubgroupSize,
           sgc.maxSubgroupSize, p.properties.limits.maxStorageBufferRange);
  }
  printf("]}\n");
  vkDestroyInstance(inst, NULL);
  return 0;
}
